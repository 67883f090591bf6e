"""Supply chain: the versions pyproject.toml pins, and the versions installed, are free of the known
advisories that touch what this project does (torch.load of checkpoints, BentoML's model store and HTTP
serving, ONNX files with external data).

ADVISORIES is the one place the numbers live; README.md's Security section shows the same table.
Each row: advisory, package, the first version that is not affected, what it is about, and where the
fixed-in number comes from. A row for an advisory that is only partly fixed does not belong here.
"""

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@dataclass(frozen=True)
class Advisory:
    id: str
    package: str
    fixed_in: str  # versions below this are affected
    what: str
    source: str  # where fixed_in comes from


ADVISORIES = [
    Advisory("CVE-2025-32434", "torch", "2.6.0", "torch.load(weights_only=True) can still run code",
             "GHSA-53q9-r3pm-6pq6 (affected <= 2.5.1, patched 2.6.0); maintainer in pytorch/pytorch#152006"),
    Advisory("CVE-2026-24747", "torch", "2.10.0", "weights_only unpickler memory corruption from a crafted checkpoint",
             "GitHub advisory for CVE-2026-24747: affected < 2.10.0, patched 2.10.0"),
    Advisory("CVE-2025-27520", "bentoml", "1.4.3", "pickle deserialization of request bodies (RCE)",
             "GHSA-33xw-247w-6hmc: affected 1.3.4 <= v < 1.4.3 (CVE record; rapid7/metasploit-framework#20041)"),
    Advisory("CVE-2025-32375", "bentoml", "1.4.8", "pickle deserialization in the runner server (RCE)",
             "PYSEC-2025-32 / GHSA-7v4r-c989-xh26: introduced 1.0.0, fixed 1.4.8"),
    Advisory("CVE-2025-54381", "bentoml", "1.4.19", "SSRF: file inputs given as URLs are fetched by the server",
             "GHSA-mrmq-3q62-6cc8: affected >= 1.4.0, < 1.4.19"),
    Advisory("CVE-2026-27905", "bentoml", "1.4.36", "tar extraction follows symlinks out of a bento or model archive",
             "NVD entry for CVE-2026-27905: versions prior to 1.4.36"),
    Advisory("CVE-2026-44345", "bentoml", "1.4.39", "Dockerfile injection through a bento's docker.base_image",
             "PYSEC-2026-189 / GHSA-78f9-r8mh-4xm2: fixed 1.4.39"),
    Advisory("CVE-2026-44346", "bentoml", "1.4.39", "Dockerfile injection through a bento's envs[*].name",
             "PYSEC-2026-190 / GHSA-w2pm-x38x-jp44: fixed 1.4.39"),
    Advisory("CVE-2024-27318", "onnx", "1.16.0", "external data location escapes the model folder (../ bypass)",
             "GHSA-whh8-fjgc-qp73: affected <= 1.15.0; onnx v1.16.0 release notes list it as fixed"),
    Advisory("CVE-2024-5187", "onnx", "1.16.2", "download_model_with_test_data tar path traversal (file overwrite)",
             "GHSA-6rq9-53c3-f7vj: affected < 1.16.2"),
    Advisory("CVE-2025-51480", "onnx", "1.18.0", "save_external_data writes outside the folder via location",
             "PYSEC-2025-148: last affected 1.17.0 (1.18.0 is the next release)"),
    Advisory("CVE-2026-27489", "onnx", "1.21.0", "external data read through a symlink out of the model folder",
             "PYSEC-2026-2239 / GHSA-3r9x-f23j-gc73: fixed 1.21.0"),
    Advisory("CVE-2026-34446", "onnx", "1.21.0", "external data read through a hard link",
             "PYSEC-2026-2241 / GHSA-cmw6-hcpp-c6jp: fixed 1.21.0"),
    Advisory("CVE-2026-34447", "onnx", "1.21.0", "external data read through a symlinked parent folder",
             "PYSEC-2026-104 / GHSA-p433-9wv8-28xj: fixed 1.21.0"),
]


def affected(package: str, version: str) -> list[str]:
    """The advisories in ADVISORIES that `version` of `package` is affected by."""
    v = Version(version)
    return [a.id for a in ADVISORIES if a.package == package and v < Version(a.fixed_in)]


def pins() -> dict[str, str]:
    """package -> the exact version pyproject.toml pins (only `==` pins)."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    found = {}
    for dep in deps:
        req = Requirement(dep)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            found[req.name.lower()] = specs[0].version
    return found


PACKAGES = sorted({a.package for a in ADVISORIES})


def test_the_table_is_well_formed():
    assert len({a.id for a in ADVISORIES}) == len(ADVISORIES)
    for a in ADVISORIES:
        Version(a.fixed_in)  # parses
        assert a.id.startswith(("CVE-", "GHSA-")) and a.source and a.what


@pytest.mark.parametrize("package", PACKAGES)
def test_package_is_pinned_exactly(package):
    assert package in pins(), f"pyproject.toml must pin {package} with ==, so the advisory check means something"


@pytest.mark.parametrize("package", PACKAGES)
def test_pinned_version_has_no_known_advisory(package):
    assert affected(package, pins()[package]) == [], f"{package}=={pins()[package]}"


@pytest.mark.parametrize("package", PACKAGES)
def test_installed_version_is_the_pin_and_has_no_known_advisory(package):
    installed = importlib.metadata.version(package)
    assert affected(package, installed) == [], f"{package} {installed} is installed"
    # A local build tag (torch's +cu128) is the same release.
    assert Version(installed).public == Version(pins()[package]).public, (
        f"{package} {installed} is installed but pyproject.toml pins {pins()[package]}: pip install -e .")


def test_the_check_flags_vulnerable_versions():
    # The check itself can fail: versions before each fix are reported, the fixed ones are not.
    assert "CVE-2025-32434" in affected("torch", "2.5.1")
    assert affected("torch", "2.6.0") == ["CVE-2026-24747"]
    assert set(affected("bentoml", "1.4.2")) >= {"CVE-2025-27520", "CVE-2025-32375", "CVE-2025-54381"}
    assert affected("bentoml", "1.4.38") == ["CVE-2026-44345", "CVE-2026-44346"]
    assert "CVE-2024-27318" in affected("onnx", "1.15.0") and "CVE-2024-27318" not in affected("onnx", "1.16.0")
    assert affected("onnx", "1.21.0") == []


# Where each group of files may take its third-party imports from: the package's own dependencies,
# plus the dev extra for the tests. Imports inside functions count too (ast walks the whole file).
IMPORT_SCOPES = {("t2d", "models", "train", "export", "serve"): ("dependencies",),
                 # examples: users' tasks, run in development; bench: developers' measurements (baselines such as
                 # scikit-learn's naive Bayes come from the dev extra)
                 ("tests", "examples", "bench"): ("dependencies", "dev")}
# The tests import each other's helpers (conftest, serving, test_task...): every module in tests/ is ours.
OWN_MODULES = {"t2d", "models", "train", "export", "serve", "bench", "examples",
               *(p.stem for p in (PYPROJECT.parent / "tests").glob("*.py"))}


def _declared(groups: tuple[str, ...]) -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [r for g in groups for r in (project["dependencies"] if g == "dependencies"
                                       else project["optional-dependencies"][g])]
    return {Requirement(r).name.lower().replace("_", "-") for r in reqs}


def _imported_modules(folder: Path) -> dict[str, Path]:
    import ast
    import sys

    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN_MODULES:
                    found.setdefault(top, path)
    return found


@pytest.mark.parametrize("folders,groups", IMPORT_SCOPES.items(), ids=lambda v: "+".join(v))
def test_every_third_party_import_is_declared(folders, groups):
    """A module imported directly must come from a declared distribution, not arrive as a dependency of a
    dependency (which a new release of that dependency may drop)."""
    declared = _declared(groups)
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for folder in folders:
        for module, path in _imported_modules(PYPROJECT.parent / folder).items():
            dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
            if not dists & declared:
                undeclared.append(f"{module} ({', '.join(sorted(dists))}) in {path.relative_to(PYPROJECT.parent)}")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
