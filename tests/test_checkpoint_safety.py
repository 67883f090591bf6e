"""Checkpoints that are hostile, broken or half-written: refused with one line, never loaded, never registered.

    python -m pytest tests/test_checkpoint_safety.py -q      # about a minute on 2 busy CPU cores

What is checked:
- a checkpoint whose pickle runs code is refused by `python -m train --resume` and `python -m export`,
  also with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment, and its code never runs;
- truncated, empty, random, foreign, mismatched (keys, shapes, dtypes) and non-finite checkpoints are
  refused by --resume and by export with the same one line, and nothing reaches the model store;
- a resume checkpoint with a wrongly shaped optimizer state is a one-line error, not a traceback;
- SIGKILL at random moments during saves leaves a complete old or new checkpoint, and the next run
  deletes the temp files such kills leave;
- a loss that becomes NaN leaves best.pt byte for byte as it was.
"""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PRODUCT, REPO, predictor, train
import zygote

import t2d
from models.checkpoint import (FORMAT, CheckpointError, load_checkpoint, remove_stale_temp_files, save_checkpoint,
                               serialize, validate_checkpoint)
from train.fit import check_optimizer_state
from train.main import main as train_main

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true"}
FAST = ["--device", "cpu", "--log.tensorboard", "false", "--log.plots", "false"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def one_error_line(err: str) -> str:
    """The single stderr line, which must start with 'error: '; no traceback, no warnings, no colour codes."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err and "\x1b" not in err, err
    return lines[0]


def store_models(home: Path) -> list[Path]:
    """Model versions in the BentoML store at `home` ($BENTOML_HOME/models/<name>/<version>/)."""
    root = home / "models"
    return sorted(p for p in root.glob("*/*") if p.is_dir()) if root.exists() else []


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A finished 2-epoch product run: last.pt and best.pt that resume and export cleanly."""
    out = tmp_path_factory.mktemp("good") / "run"
    train([*PRODUCT, "--epochs", "2", "--optim.lr", "0.01"], out)
    return out


# --- a checkpoint whose pickle would run code ----------------------------------------------------

class RunsCode:
    """Unpickling this calls exec: it writes `marker`. torch.save pickles the call, not this class."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """Our format marker and keys, with the code where the weights should be."""
    torch.save({"format": FORMAT, "format_version": 1, "task": "product", "arch": "product_mlp",
                "model_config": {}, "state_dict": {"net.layers.0.weight": RunsCode(marker)}, "epoch": 1,
                "config": {}, "resume": {}}, path)
    return path


@pytest.mark.slow
def test_pickled_code_never_runs_even_when_the_environment_forces_unsafe_loads(tmp_path):
    env = {**ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "BENTOML_HOME": str(tmp_path / "bentoml")}
    evil = evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    control = evil_checkpoint(tmp_path / "control.pt", tmp_path / "control_ran")
    py = [sys.executable, "-m"]
    procs = {  # all three at once: each pays torch's import
        # The file is live and the variable works: a torch.load that does not pass weights_only runs the code.
        "control": subprocess.Popen([sys.executable, "-c", f"import torch; torch.load({str(control)!r})"], env=env,
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "train": subprocess.Popen([*py, "train", *FAST, "--resume", str(evil), "--out", str(tmp_path / "out")],
                                  env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "export": subprocess.Popen([*py, "export", "--checkpoint", str(evil), "--out", str(tmp_path / "export")],
                                   env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    done = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    assert done["control"][0] == 0 and (tmp_path / "control_ran").read_text() == "pwned", done["control"]
    for name in ("train", "export"):
        rc, _, err = done[name]
        assert rc == 2, (name, err)
        line = one_error_line(err)
        assert f"cannot read checkpoint {evil}: it pickles code" in line and "GLOBAL exec" in line, line
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "export").exists()
    assert store_models(tmp_path / "bentoml") == []


# --- broken, foreign and mismatched checkpoints ----------------------------------------------------

def ours(good: Path, path: Path, edit) -> Path:
    """good/last.pt with `edit` applied to its loaded dict, saved as our format again."""
    ckpt = load_checkpoint(good / "last.pt")
    edit(ckpt)
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, path)
    return path


def set_weight(key: str, value):
    return lambda ckpt: ckpt["state_dict"].__setitem__(key, value(ckpt["state_dict"][key]))


W0 = "net.layers.0.weight"  # (16, 2): the first layer of the product MLP
# name -> (how to make the file from the good run's last.pt, what the one error line says)
BROKEN = {
    "truncated": (lambda g, p: p.write_bytes((g / "last.pt").read_bytes()[: (g / "last.pt").stat().st_size // 2]),
                  "not a loadable PyTorch file"),
    "empty": (lambda g, p: p.write_bytes(b""), "the file is empty"),
    "random bytes": (lambda g, p: p.write_bytes(random.Random(0).randbytes(8192)), "not a loadable PyTorch file"),
    "foreign list": (lambda g, p: torch.save([torch.ones(2), 3], p), "is not a train-to-deploy checkpoint"),
    "foreign dict": (lambda g, p: torch.save({k: v for k, v in load_checkpoint(g / "last.pt").items() if k != "format"},
                                             p), "is not a train-to-deploy checkpoint"),
    "missing weight": (lambda g, p: ours(g, p, lambda c: c["state_dict"].pop("net.layers.2.bias")),
                       "does not match its architecture 'product_mlp': missing weights net.layers.2.bias"),
    "extra weight": (lambda g, p: ours(g, p, lambda c: c["state_dict"].__setitem__("net.layers.9.weight",
                                                                                  torch.zeros(3))),
                     "unexpected weights net.layers.9.weight"),
    "wrong shape": (lambda g, p: ours(g, p, set_weight(W0, lambda w: torch.zeros(16, 3))),
                    f"{W0} has shape [16, 3], the network's is [16, 2]"),
    "float64 weights": (lambda g, p: ours(g, p, set_weight(W0, lambda w: w.double())),
                        f"{W0} is torch.float64, the network's is torch.float32"),
    "integer weights": (lambda g, p: ours(g, p, set_weight(W0, lambda w: w.round().int())),
                        f"{W0} is torch.int32, the network's is torch.float32"),
    "config of another network": (lambda g, p: ours(g, p, lambda c: c["model_config"].update(hidden=[8, 8])),
                                  "net.layers.0.weight has shape [16, 2], the network's is [8, 2]"),
    "unknown architecture": (lambda g, p: ours(g, p, lambda c: c.update(arch="resnet")),
                             "does not match its architecture 'resnet': unknown model.arch 'resnet' for task product"),
    # a built-in task's checkpoint is checked against the network of the task it names
    "another task's name": (lambda g, p: ours(g, p, lambda c: c.update(task="mnist")),
                            "does not match its architecture 'product_mlp': unknown model.arch 'product_mlp' for task "
                            "mnist"),
    "version-1 size key": (lambda g, p: ours(g, p, lambda c: c["model_config"].update(num_classes=10)),
                           "does not match its architecture 'product_mlp': unknown model.num_classes"),
    "NaN weight": (lambda g, p: ours(g, p, set_weight(W0, lambda w: w.index_fill(1, torch.tensor([1]), float("nan")))),
                   f"has non-finite weights in {W0}"),
    "inf statistic": (lambda g, p: ours(g, p, set_weight("input_norms.0.std", lambda s: s * float("inf"))),
                      "has non-finite weights in input_norms.0.std"),
}


@pytest.fixture(scope="module")
def broken(good, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    for name, (make, _) in BROKEN.items():
        make(good, folder / f"{name.replace(' ', '_')}.pt")
    return folder


def broken_file(broken: Path, name: str) -> Path:
    return broken / f"{name.replace(' ', '_')}.pt"


def test_validate_checkpoint_refuses_the_dtypes_load_state_dict_casts(broken):
    """torch casts float64 and int weights into the float32 network silently; our dtype check refuses them."""
    for name in ("float64 weights", "integer weights"):
        raw = torch.load(broken_file(broken, name), weights_only=True)
        # torch alone accepts it: were that to change, this file would no longer reach our check
        predictor("product", "product_mlp").load_state_dict(raw["state_dict"])
        with pytest.raises(CheckpointError, match=re.escape(BROKEN[name][1])):
            validate_checkpoint(raw, t2d.builtin_tasks()["product"])


@pytest.mark.parametrize("name", BROKEN)
def test_resume_refuses_with_one_line(broken, tmp_path, capsys, name):
    path = broken_file(broken, name)
    before = path.read_bytes()
    rc = train_main([*FAST, "--resume", str(path), "--epochs", "5", "--out", str(tmp_path / "out")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and BROKEN[name][1] in line and str(path) in line, line
    assert not (tmp_path / "out").exists()  # refused before any run folder exists
    assert path.read_bytes() == before


EXPORT_ALL = """
import contextlib, io, json, sys, warnings
warnings.simplefilter("always")  # a warning would be a second stderr line: show every one
from export.main import main
results = {}
for name, path, out in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--checkpoint", path, "--out", out])
    results[name] = [rc, err.getvalue()]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_export_refuses_the_same_files_with_the_same_line_and_registers_nothing(broken, good, tmp_path, capsys):
    """Every broken file through `export.main.main` with registration on, in one process with its own
    BENTOML_HOME (BentoML reads it at import), then the good best.pt: the store ends with that one model."""
    home = tmp_path / "bentoml"
    jobs = [[name, str(broken_file(broken, name)), str(tmp_path / f"export{i}")] for i, name in enumerate(BROKEN)]
    jobs.append(["good", str(good / "best.pt"), str(tmp_path / "export_good")])
    done = zygote.run(["-c", EXPORT_ALL, json.dumps(jobs)], tmp_path, {**ENV, "BENTOML_HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    for name, path, out in jobs[:-1]:
        rc, err = results[name]
        line = one_error_line(err)
        assert rc == 2 and BROKEN[name][1] in line, (name, line)
        assert not Path(out).exists(), name  # refused before any artifact was written
        # --resume refuses it with exactly the same line
        capsys.readouterr()
        assert train_main([*FAST, "--resume", path, "--epochs", "5", "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.strip() == line, name
    assert results["good"][0] == 0, results["good"]  # the store check below can see a registration
    (entry,) = store_models(home)
    assert str(good / "best.pt") in (entry / "model.yaml").read_text()


# --- training state that does not fit the model ---------------------------------------------------

def edit_optimizer(edit):
    return lambda ckpt: edit(ckpt["resume"]["optimizer"])


BAD_STATE = {
    # Adam's first moment of the first layer with another shape: torch's load_state_dict accepts it (it
    # checks only parameter counts), and without our check the first step crashed the process (SIGSEGV).
    "moment of the wrong shape": (edit_optimizer(lambda o: o["state"][0].__setitem__("exp_avg", torch.zeros(3))),
                                  "optimizer state exp_avg of parameter 0 has shape [3], the parameter's is [16, 2]"),
    # (16, 1) moments broadcast against the (16, 2) weights: without our check, training went on silently.
    "optimizer of another network": (
        edit_optimizer(lambda o: o["state"].update({i: {**s, "exp_avg": s["exp_avg"][..., :1]}
                                                    for i, s in o["state"].items() if s["exp_avg"].dim() == 2})),
        "optimizer state exp_avg of parameter 0 has shape [16, 1]"),
    "parameter group of the wrong length": (edit_optimizer(lambda o: o["param_groups"][0]["params"].pop()),
                                            "doesn't match the size of optimizer's group"),
    "stopper without its fields": (lambda ckpt: ckpt["resume"].__setitem__("stopper", {"best": 1.0, "worst": 2.0}),
                                   "unexpected keyword argument 'worst'"),
    # optim.ema: the trained weights behind the saved average are loaded into the network too.
    "trained weights behind the average of another shape": (
        lambda ckpt: ckpt["resume"].__setitem__("training_weights", {
            k[4:]: v[..., :1] if v.dim() == 2 else v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}),
        "the checkpoint's config does not describe its weights: layers.0.weight has shape [16, 1]"),
    "config that does not describe the weights": (
        lambda ckpt: ckpt["config"]["model"].update(hidden=[8, 8]),
        "the checkpoint's config does not describe its weights: net.layers.0.weight has shape [16, 2]"),
}


def test_check_optimizer_state_refuses_a_moment_torch_accepts(good):
    ckpt = load_checkpoint(good / "last.pt")
    make, message = BAD_STATE["moment of the wrong shape"]
    make(ckpt)
    opt = torch.optim.Adam(predictor("product", "product_mlp").net.parameters())
    opt.load_state_dict(ckpt["resume"]["optimizer"])  # torch alone accepts it: it checks only parameter counts
    with pytest.raises(ValueError, match=re.escape(message)):
        check_optimizer_state(opt)


@pytest.mark.parametrize("name", BAD_STATE)
def test_resume_with_training_state_that_does_not_fit_is_one_line(good, tmp_path, capsys, name):
    path = ours(good, tmp_path / "bad_state.pt", BAD_STATE[name][0])
    out = tmp_path / "out"  # another run's folder: a refused resume must not touch it
    out.mkdir()
    (out / "config.yaml").write_text("another run's config\n")
    rc = train_main([*FAST, "--resume", str(path), "--epochs", "5", "--out", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and BAD_STATE[name][1] in line, line
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "another run's config\n"


# --- SIGKILL while saving --------------------------------------------------------------------------

SAVE_LOOP = """
import os, sys
from models.checkpoint import save_checkpoint
path, versions = sys.argv[1], [open(p, "rb").read() for p in sys.argv[2:]]
for _ in sys.stdin:  # one line per round: fork a saver, report its pid, wait for the test to kill it
    pid = os.fork()
    if pid == 0:  # alternate the two versions until killed
        i = 0
        while True:
            save_checkpoint(versions[i % 2], path)
            i += 1
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""
KILLS = 20


@pytest.mark.slow
def test_sigkill_mid_save_leaves_one_complete_version(tmp_path):
    """A process saving two 24 MB versions of last.pt in turn, SIGKILLed at random moments: the file is
    always exactly one of them, byte for byte; the kills' temp files are ours and the cleanup deletes them.

    The saver is forked from a helper that imported torch once, so each round costs no import.
    """
    model = predictor("product", "product_mlp").state_dict()
    versions = [serialize({"task": "product", "arch": "product_mlp", "model_config": {}, "state_dict": model,
                           "epoch": 1, "tag": tag, "blob": torch.full((6_000_000,), float(tag))}) for tag in (0, 1)]
    digests = [hashlib.sha256(v).hexdigest() for v in versions]
    for tag, data in enumerate(versions):
        (tmp_path / f"v{tag}.bin").write_bytes(data)
    ckpt_dir = tmp_path / "run"
    ckpt_dir.mkdir()
    path = ckpt_dir / "last.pt"
    save_checkpoint(versions[0], path)
    helper = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path), str(tmp_path / "v0.bin"),
                               str(tmp_path / "v1.bin")], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    rng = random.Random(0)
    seen, mid_save, left, pid = set(), 0, set(), None
    try:
        for _ in range(KILLS):
            helper.stdin.write("go\n")
            helper.stdin.flush()
            pid = int(helper.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.4))  # each save takes ~40 ms: several saves, then a kill
            os.kill(pid, signal.SIGKILL)
            status = int(helper.stdout.readline())
            pid = None  # reaped by the helper
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            digest = sha256(path)
            assert digest in digests  # exactly one whole version, never a mix or a partial file
            ckpt = load_checkpoint(path)
            tag = digests.index(digest)
            assert ckpt["tag"] == tag and torch.equal(ckpt["blob"], torch.full((6_000_000,), float(tag)))
            seen.add(tag)
            mid_save += bool(set(temp_files(ckpt_dir)) - left)  # killed between a save's mkstemp and its rename
            left = set(temp_files(ckpt_dir))
    finally:
        if pid is not None:  # a failed round: stop its saver before the helper
            os.kill(pid, signal.SIGKILL)
        helper.kill()
        helper.wait()
    print(f"{mid_save} of {KILLS} kills landed mid-save")
    assert seen == {0, 1}  # the saver did replace the file between kills
    assert mid_save >= KILLS // 2, mid_save  # most kills landed during a save (measured: nearly all)
    leftovers = temp_files(ckpt_dir)
    assert len(leftovers) == mid_save and all(n.startswith(".last.pt.") for n in leftovers)
    assert sorted(p.name for p in remove_stale_temp_files(ckpt_dir)) == leftovers
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]


def test_run_start_deletes_only_our_stale_temp_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".last.pt.k2_9zq0a.tmp", ".best.pt.abcdefgh.tmp"]  # mkstemp's 8 characters of [a-z0-9_]
    others = [".last.pt.tmp", ".last.pt.ABCDEFGH.tmp", ".other.pt.abcdefgh.tmp", "last.pt.abcdefgh.tmp",
              ".last.pt.abcdefgh.tmp.bak", "notes.tmp"]
    for name in stale + others:
        (out / name).write_bytes(b"half a checkpoint")
    (out / "sub").mkdir()
    (out / "sub" / ".last.pt.abcdefgh.tmp").write_bytes(b"")  # another folder: not this run's
    (out / ".best.pt.dirdirdi.tmp").mkdir()  # not a file
    train([*PRODUCT, "--epochs", "1"], out)
    names = {p.name for p in out.iterdir()}
    assert not names & set(stale)
    assert set(others) | {"sub", ".best.pt.dirdirdi.tmp", "last.pt", "best.pt"} <= names
    assert (out / "sub" / ".last.pt.abcdefgh.tmp").exists()


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_from_a_complete_checkpoint(tmp_path):
    """`python -m train --log.checkpoint_every_s 0` (a save every epoch) SIGKILLed at random moments,
    then continued with --resume: last.pt and best.pt always load and only move forward; the temp
    files a kill leaves are gone once the next run starts, and none remain at the end."""
    out = tmp_path / "run"
    # Wide layers: each epoch saves ~13 MB (weights and Adam's moments) twice, so kills often land in a save.
    train([*PRODUCT, "--data.size", "100", "--model.hidden", "1024,1024", "--log.checkpoint_every_s", "0",
           "--log.print_every", "100000", "--epochs", "2"], out)
    rng = random.Random(1)
    last_epoch, mid_save, left = load_checkpoint(out / "last.pt")["epoch"], 0, []
    for _ in range(5):
        inode = (out / "last.pt").stat().st_ino
        # Forked from the zygote: a process of its own, killed as one, without a fresh interpreter's 5 s of imports.
        proc = zygote.start(["-m", "train", "--resume", str(out / "last.pt"), "--epochs", "100000", *FAST],
                            tmp_path, ENV)
        deadline = time.monotonic() + 120
        while (out / "last.pt").stat().st_ino == inode:  # training and saving: the file was replaced
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        assert not set(left) & set(temp_files(out))  # the previous kill's temp file went when this run started
        time.sleep(rng.uniform(0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        left = temp_files(out)
        mid_save += bool(left)
        last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
        assert last["epoch"] > last_epoch and best["epoch"] <= last["epoch"]
        assert last["resume"]["stopper"]["best_epoch"] >= best["epoch"]
        last_epoch = last["epoch"]
    print(f"{mid_save} of 5 kills landed mid-save")
    done = zygote.run(["-m", "train", "--resume", str(out / "last.pt"), "--epochs", str(last_epoch + 2), *FAST],
                      tmp_path, ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert temp_files(out) == [] and load_checkpoint(out / "last.pt")["epoch"] == last_epoch + 2


# --- NaN: best.pt stays as it was ------------------------------------------------------------------

@pytest.mark.parametrize("every_s", ["0", "1e9"])  # a save every epoch; deferred saves (only at the end)
def test_nan_after_finite_epochs_leaves_best_pt_byte_for_byte(tmp_path, capsys, every_s):
    """Epochs 1-4 train at lr 1e-3, then the step schedule multiplies the rate by 1e30 and epoch 5 blows
    up. min_delta this large: only epoch 1 improves, so best.pt is epoch 1's from the first run.
    tests/test_distributed.py covers a resume straight into the NaN; here finite epochs come first."""
    out = tmp_path / "run"
    args = [*FAST, *PRODUCT, "--stop.min_delta", "1e9", "--sched.name", "step", "--sched.step_size", "4",
            "--sched.gamma", "1e30", "--log.checkpoint_every_s", every_s, "--out", str(out)]
    assert train_main([*args, "--epochs", "2"]) == 0
    best = out / "best.pt"
    before = (sha256(best), best.stat().st_ino, best.stat().st_mtime_ns)
    assert load_checkpoint(best)["epoch"] == 1
    capsys.readouterr()
    rc = train_main(["--resume", str(out / "last.pt"), "--epochs", "8", "--log.checkpoint_every_s", every_s])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "loss became" in line and "best.pt and last.pt keep the last finite epoch" in line, line
    assert (sha256(best), best.stat().st_ino, best.stat().st_mtime_ns) == before  # not even rewritten
    assert load_checkpoint(out / "last.pt")["epoch"] == 4  # the last finite epoch, written despite the NaN
    assert temp_files(out) == []
