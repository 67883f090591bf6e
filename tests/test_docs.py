"""The docs cannot rot: the blocks a user would copy from them are run here, as the pages show them.

A fenced block right after `<!-- run -->` in a page of docs/ (or `<!-- run: NAME -->`) is run:
- a `console` block is a session: each `$ command` runs in a fresh folder (the repository's layout for a
  user's files, a model store of its own), and the lines under it are what it must print. `...` stands
  for any lines; a JSON line must have the same keys, list lengths, strings and booleans (numbers and
  store versions differ from run to run); any other line must read the same with its numbers masked
  (and an epoch line's `*`, which marks a new best, may come and go).
  `bentoml serve ... &` starts a real server from the repository root, on a free port instead of 3000.
- a `python` block named after a path (`<!-- run: examples/diabetes.py -->`) is written there first;
  `--8<-- "FILE"` inside it is the snippet that includes FILE, so the page shows the file itself.
- `<!-- run: setup -->` is the first command of the README and of Getting started, with
  `<!-- output: setup -->` its output; it runs with fewer epochs and stops at "serving on".
The README's own-model example is run the same way. A plain `python -m MODULE ARGS` runs forked from the
suite's zygote (tests/zygote.py): the same module, arguments, folder and environment, less the torch import.
Not run: commands that need data or machines the suite lacks (MNIST files, GPUs, torchrun across
nodes) and clients it does not install (datamodel-codegen, openapi-generator). A client file's address
(127.0.0.1:3000) becomes the session server's, as commands' do.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO
from serving import Server, copy_store, env_for, exported
import zygote

DOCS = REPO / "docs"
BLOCK = re.compile(r"^<!-- (?P<kind>run|output)(?::\s*(?P<name>\S+))? -->\n```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```$",
                   re.M | re.S)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)
PAGES_RUN = {"getting-started.md", "own-model.md", "serving.md", "signatures.md"}  # the pages whose blocks the tests below run
SHELL = re.compile(r"[|&;<>$`*?~(){}\\]")  # a command with any of these is the shell's to run
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@dataclass
class Block:
    kind: str  # run | output
    name: str | None
    lang: str
    body: str  # snippets included


def blocks(path: Path) -> list[Block]:
    """The marked blocks of a Markdown file, in order, with `--8<-- "FILE"` replaced by FILE's text."""
    found = []
    for m in BLOCK.finditer(path.read_text()):
        body = SNIPPET.sub(lambda s: (REPO / s["path"]).read_text().rstrip("\n"), m["body"].rstrip("\n"))
        found.append(Block(m["kind"], m["name"], m["lang"], body))
    return found


def session_commands(body: str) -> list[tuple[str, list[str]]]:
    """A console block's commands (a trailing backslash continues one on the next line) and the lines under each."""
    commands, continued = [], False
    for line in body.splitlines():
        if continued:
            commands[-1][0] += "\n" + line
        elif line.startswith("$ "):
            commands.append([line[2:], []])
        else:
            assert commands, f"a console block must start with a $ command, not {line!r}"
            commands[-1][1].append(line)
        continued = line.endswith("\\")
    return [(cmd, out) for cmd, out in commands]


# --- what an output line must match ------------------------------------------------------------------

VERSION = re.compile(r"\b[a-z0-9]{16}\b")  # a BentoML store version, e.g. product:sqv7xyhr6gn6aax4
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def skeleton(line: str) -> str:
    line = line.removesuffix(" *")  # an epoch line's mark of a new best: it falls on other epochs in other runs
    return " ".join(NUMBER.sub("#", VERSION.sub("<version>", line)).split())


def same_json(expected, actual, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), f"{where}: {actual!r} is not like {expected!r}"
        for k in expected:
            same_json(expected[k], actual[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} is not like {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            same_json(e, a, f"{where}[{i}]")
    elif isinstance(expected, bool) or expected is None:
        assert actual is expected, f"{where}: {actual!r}, the docs say {expected!r}"
    elif isinstance(expected, (int, float)):
        assert isinstance(actual, (int, float)) and not isinstance(actual, bool), f"{where}: {actual!r} is not a number"
    else:
        assert isinstance(actual, str) and VERSION.sub("<version>", actual) == VERSION.sub("<version>", expected), (
            f"{where}: {actual!r}, the docs say {expected!r}")


def line_matches(expected: str, actual: str) -> bool:
    try:
        want = json.loads(expected)
    except ValueError:
        return skeleton(expected) == skeleton(actual)
    if not isinstance(want, (dict, list)):
        return skeleton(expected) == skeleton(actual)
    try:
        same_json(want, json.loads(actual))
    except (ValueError, AssertionError):
        return False
    return True


def lines_match(expected: list[str], actual: list[str]) -> bool:
    """`actual` line by line as `expected` shows it, where `...` stands for any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(lines_match(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and line_matches(expected[0], actual[0]) and lines_match(expected[1:], actual[1:])


def assert_prints(cmd: str, expected: list[str], actual: str) -> None:
    want = [line for line in expected if line.strip()]
    got = [line for line in actual.splitlines() if line.strip()]
    if want and not lines_match(want, got):
        pytest.fail(f"$ {cmd}\nprinted:\n{actual}\nthe docs show:\n" + "\n".join(expected))


# --- running a page -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DocServer(Server):
    """`bentoml serve` as a page writes it, run from the repository root (Server's waiting, requests and stop)."""

    def __init__(self, argv: list[str], port: int, env: dict, log: Path):
        """argv: `python`'s arguments (`["-m", "bentoml", "serve", ...]`)."""
        self.port, self.log_path = port, log
        with open(log, "w") as f:
            self.proc = zygote.start(argv, REPO, env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                     fork_children=True)


class Session:
    """One page's commands: a folder to run them in, a model store, and the server they start."""

    def __init__(self, folder: Path, home: Path):
        self.folder, self.port, self.server = folder, free_port(), None
        # `python` and `bentoml` are this interpreter's; the repository is importable from the folder.
        self.env = env_for(home, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))

    def local(self, cmd: str) -> str:
        return cmd.replace("127.0.0.1:3000", f"127.0.0.1:{self.port}").replace("--port 3000", f"--port {self.port}")

    def printed(self, out: str) -> str:
        return out.replace(f"127.0.0.1:{self.port}", "127.0.0.1:3000")

    def write(self, block: Block) -> None:
        path = self.folder / block.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.local(block.body) + "\n")  # a client's address: this session's server

    def run(self, cmd: str, expected: list[str]) -> None:
        if cmd.startswith("bentoml serve ") and cmd.endswith("&"):
            assert self.server is None, "one server a page"
            argv = shlex.split(self.local(cmd[:-1]))
            self.server = DocServer(["-m", "bentoml", *argv[1:]], self.port, self.env,
                                    self.folder / "serve.log").wait_ready()
            return
        argv = shlex.split(self.local(cmd))
        if argv[:2] == ["python", "-m"] and not SHELL.search(cmd):
            proc = zygote.run(argv[1:], self.folder, self.env, 600)  # what `python -m` does, without importing torch again
        else:
            proc = subprocess.run(["bash", "-c", self.local(cmd)], cwd=self.folder, env=self.env, capture_output=True,
                                  text=True, timeout=600)
        assert proc.returncode == 0, f"$ {cmd}\nexited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert_prints(cmd, expected, self.printed(proc.stdout))

    def run_page(self, page: Path) -> None:
        marked = [b for b in blocks(page) if b.kind == "run" and b.name != "setup"]
        assert marked, f"{page.name} has no <!-- run --> block"
        for block in marked:
            if block.lang == "python":
                self.write(block)
            elif block.lang == "console":
                for cmd, expected in session_commands(block.body):
                    self.run(cmd, expected)
            else:
                raise AssertionError(f"{page.name}: no way to run a {block.lang!r} block")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def session(tmp_path):
    s = Session(tmp_path / "work", tmp_path / "bentoml")
    s.folder.mkdir()
    yield s
    s.close()


# --- the tests --------------------------------------------------------------------------------------------

def test_every_page_with_runnable_blocks_is_run_here():
    marked = {p.name for p in DOCS.glob("*.md") if any(b.kind == "run" for b in blocks(p))}
    assert marked == PAGES_RUN, "a page with <!-- run --> blocks needs a test below that runs it"
    for page in PAGES_RUN:
        for b in blocks(DOCS / page):
            if b.lang == "console":
                assert session_commands(b.body), f"docs/{page}: an empty console block"


def test_the_own_model_page_shows_the_example_file_itself():
    files = [b for b in blocks(DOCS / "own-model.md") if b.kind == "run" and b.lang == "python"]
    assert [b.name for b in files] == ["examples/diabetes.py"]
    assert files[0].body + "\n" == (REPO / "examples" / "diabetes.py").read_text()


def test_the_readme_and_getting_started_give_the_same_first_command():
    readme = [b.body for b in blocks(REPO / "README.md") if (b.kind, b.name) == ("run", "setup")]
    docs = [b.body for b in blocks(DOCS / "getting-started.md") if (b.kind, b.name) == ("run", "setup")]
    assert len(readme) == 1 and readme == docs


def test_the_output_check_tells_a_changed_answer_from_another_run():
    shown = '{"model_name":"product","model_version":"sqv7xyhr6gn6aax4","parameters":{"variant":"fp32"},"outputs":[{"shape":[2,1],"data":[12.18,11.89]}]}'
    another_run = '{"model_name":"product","model_version":"s2nuf2xr6ktkcax4","parameters":{"variant":"fp32"},"outputs":[{"shape":[2,1],"data":[23.9,7.5]}]}'
    assert line_matches(shown, another_run)
    # What the README showed before "parameters" was added to every answer: a page like that now fails.
    stale = '{"model_name":"product","model_version":"sqv7xyhr6gn6aax4","outputs":[{"shape":[2,1],"data":[12.18,11.89]}]}'
    assert not line_matches(stale, another_run)
    assert not line_matches(shown, another_run.replace('"fp32"', '"int8"'))  # a string
    assert not line_matches(shown, another_run.replace("[2,1]", "[2,1,1]"))  # a list's length
    assert not line_matches('{"extrapolated":false}', '{"extrapolated":true}')
    assert not line_matches('{"error":"send FP32"}', '{"error":"send FP64"}')
    assert line_matches("done: 145 epochs (early_stopping), best epoch 115, train 3.42s; test mre 39.47%",
                        "done: 30 epochs (early_stopping), best epoch 2, train 0.4s; test mre 1e-05%")
    assert not line_matches("done: 145 epochs (early_stopping)", "done: 145 epochs (max_epochs)")
    assert lines_match(["...", "wrote a"], ["config", "x: 1", "wrote a"])
    assert not lines_match(["wrote a"], ["config", "wrote a"])  # no ... : every line counts
    assert not lines_match(["...", "wrote a"], ["wrote a", "and more"])


@pytest.mark.slow
@needs_curl
def test_own_model_page_runs_as_shown(session):
    # The page's own copy of the task file is the one trained: written into the session's folder, which
    # `python -m` puts first on the path, ahead of the repository's examples/.
    session.run_page(DOCS / "own-model.md")
    summary = json.loads((session.folder / "runs" / "diabetes" / "summary.json").read_text())
    assert summary["task"] == "diabetes"


@pytest.mark.slow
@needs_curl
@pytest.mark.skipif(not Path("/usr/share/dict/french").is_file(), reason="Debian's word lists are not installed "
                    "(.ci/run installs them)")
def test_signatures_page_runs_as_shown(session):
    """examples/language_id.py on Debian's word lists, briefly; text to the server with curl and with tritonclient."""
    session.run_page(DOCS / "signatures.md")


@pytest.mark.slow
@needs_curl
def test_serving_page_runs_as_shown(session, tmp_path_factory):
    copy_store(exported(tmp_path_factory), Path(session.env["BENTOML_HOME"]))  # the suite's tiny product and classifier
    session.run_page(DOCS / "serving.md")


@pytest.mark.slow
def test_the_readme_own_model_example_trains_and_exports(session):
    session.run_page(REPO / "README.md")
    summary = json.loads((session.folder / "runs" / "mine" / "summary.json").read_text())
    assert summary["task"] == "mine" and summary["test"]["mre"] > 0
    assert (Path(session.env["BENTOML_HOME"]) / "models" / "mine" / "latest").is_file()  # registered


@pytest.mark.slow
@needs_curl
def test_getting_started_runs_as_shown(session):
    """The first command, as Getting started and the README give it, less the install (the suite runs installed),
    with 3 epochs instead of 1000, until the demo says it is serving; then its output against the page's."""
    marked = {(b.kind, b.name): b for b in blocks(DOCS / "getting-started.md")}
    command, expected = marked["run", "setup"].body.strip(), marked["output", "setup"].body.splitlines()
    install, _, rest = command.partition(" && ")
    assert install == "pip install -e .", command
    steps = rest.split(" && ")
    assert steps[0] == "python -m train --task product" and steps[-1] == "bash serve/demo.sh", command
    steps[0] += " --epochs 3"
    steps[-1] = f"bash {REPO}/serve/demo.sh"  # it serves from the repository root, as from a clone
    log = session.folder / "serve.log"
    env = {**session.env, "PORT": str(session.port), "LOG": str(log)}
    proc = subprocess.Popen(["bash", "-c", " && ".join(steps)], cwd=session.folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    serving = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("serving on "):
                serving.set()
        serving.set()  # it ended without serving: the checks below say how

    threading.Thread(target=read, daemon=True).start()
    try:
        assert serving.wait(600) and proc.poll() is None, "the command stopped before serving:\n" + "\n".join(lines)
    finally:
        stop_tree(proc)
    printed = session.printed("\n".join(lines)).replace(str(log), "serve.log")
    assert_prints(command, expected, printed)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (the demo's trap stops its server, whose workers run in their own
    sessions), then SIGKILL to whatever of the tree is left after 30 s."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    end = time.monotonic() + 30
    while time.monotonic() < end and any(Path(f"/proc/{pid}").exists() for pid in tree):
        time.sleep(0.2)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the site ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_site_builds_strictly_and_loads_nothing_from_the_internet(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    assert {"index.html", "own-model/index.html", "reference/index.html", "benchmarks/index.html"} <= pages, pages
    external = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["']?(?:https?:)?//""", re.I)
    css_import = re.compile(r"""@import\s+(?:url\()?["']?(?:https?:)?//|url\(["']?(?:https?:)?//""", re.I)
    for path in site.rglob("*"):
        if path.suffix == ".html":
            hits = external.findall(path.read_text())
            assert not hits, f"{path.relative_to(site)} loads {hits[:3]} from the internet"
        elif path.suffix == ".css":
            assert not css_import.search(path.read_text()), f"{path.relative_to(site)} loads from the internet"
    # The reference is generated from the docstrings: a field's docstring is on the page.
    reference = (site / "reference" / "index.html").read_text()
    assert "One sample, without the batch axis" in reference
