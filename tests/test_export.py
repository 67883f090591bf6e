"""`python -m export`: artifacts in raw units, parity against the eager model, and a parity-gated model store.

Checkpoints come from real (tiny) training runs; parity runs the real onnxruntime and reloads the
saved TorchScript file. Registration goes to a temporary BENTOML_HOME in a subprocess, because
BentoML reads BENTOML_HOME once, at import.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import PRODUCT, REPO, predictor, train, write_image_set
from serving import export_cli, store_entries
import zygote

import t2d
from export.main import main
from models.checkpoint import load_checkpoint, predictor_from_checkpoint, save_checkpoint

TASKS = t2d.builtin_tasks()

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of the three architectures, and an image folder with 1024 test images (the largest batch)."""
    root = tmp_path_factory.mktemp("export")
    images = write_image_set(root / "idx", n_train=300, n_test=1024)
    image_args = ["--task", "fashion-mnist", "--data-dir", str(images), "--data.download", "false",
                  "--data.val_size", "50", "--epochs", "1"]
    train([*PRODUCT, "--epochs", "3"], root / "product")
    train([*image_args, "--model.arch", "mlp"], root / "mlp")
    train([*image_args, "--model.arch", "cnn", "--model.channels", "[4, 8, 8]"], root / "cnn")
    return root


@pytest.mark.parametrize("arch", ["product", "mlp", "cnn"])
def test_parity_at_three_batch_sizes(runs, tmp_path, arch, capsys):
    out = tmp_path / "export"
    assert main(["--checkpoint", str(runs / arch / "best.pt"), "--out", str(out), "--no-register"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["batch_sizes"] == [1, 7, 1024]
    assert sorted((c["format"], c["batch"]) for c in report["checks"]) == sorted(
        (f, b) for f in ("onnx", "torchscript") for b in (1, 7, 1024))
    for c in report["checks"]:
        assert c["passed"] and c["max_abs_err"] <= 1e-5 + 1e-5 * 1e4, c
        assert c["shape"][0][0] == c["batch"]
    if arch == "product":  # fresh points over the training square, from the task's parity_inputs
        assert report["inputs"] == "1024 inputs from task product's parity_inputs, seed 20261123"
    else:  # real held-out images, not noise
        assert report["inputs"] == "first 1024 test inputs of task fashion-mnist"
        assert all(c["argmax_agreement"] == 1.0 for c in report["checks"])
    printed = capsys.readouterr().out
    assert "onnx " in printed and "torchscript " in printed and "registered" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.torchscript.pt", "parity.json"]


def test_onnx_contract_and_self_contained_file(runs, tmp_path):
    out = tmp_path / "export"
    assert main(["--format", "onnx", "--checkpoint", str(runs / "product" / "best.pt"), "--out", str(out),
                 "--no-register", "--batch-sizes", "1,3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "parity.json"]  # no .data side file
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(str(out / "model.onnx"))
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == ("x", "y")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 2  # dynamic batch, two raw inputs
    props = {p.key: p.value for p in model.metadata_props}
    contract = json.loads(props["contract"])
    ckpt = load_checkpoint(runs / "product" / "best.pt")
    assert contract["inputs"][0]["name"] == "x" and contract["outputs"][0]["shape"] == ["batch", 1]
    assert contract["normalization"] == ckpt["normalization"]
    assert contract["train_range"] == [[1.0, 10.0], [1.0, 10.0]]


def test_classifier_contract_takes_unit_pixels(runs, tmp_path):
    """The graph takes pixels in [0, 1], the units training used: no scaling inside or outside the graph."""
    out = tmp_path / "export"
    assert main(["--format", "onnx", "--checkpoint", str(runs / "cnn" / "best.pt"), "--out", str(out),
                 "--no-register", "--batch-sizes", "2"]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    pixels = np.random.default_rng(0).random(size=(5, 1, 28, 28)).astype(np.float32)  # [0, 1]
    ckpt = load_checkpoint(runs / "cnn" / "best.pt")
    eager = predictor_from_checkpoint(ckpt, TASKS["fashion-mnist"])
    with torch.no_grad():
        want = eager(torch.from_numpy(pixels)).numpy()  # training's units: [0, 1]
        # the network sees (pixels - mean) / std with statistics fitted on [0, 1] pixels: nothing else scales them
        mean, std = ckpt["state_dict"]["input_norms.0.mean"], ckpt["state_dict"]["input_norms.0.std"]
        assert 0 < mean.item() < 1 and 0 < std.item() < 1
        assert torch.equal(eager.net.eval()((torch.from_numpy(pixels) - mean) / std), torch.from_numpy(want))
    got = session.run(None, {"image": pixels})[0]
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    contract = json.loads({p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}["contract"])
    assert contract["contract_version"] == 3 and contract["kind"] == "classification" and "pixel_scale" not in contract
    assert contract["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 28, 28], "range": [0, 1],
                                   "description": "grayscale pixels in [0, 1]"}]
    assert contract["outputs"][0]["shape"] == ["batch", 10] and contract["variant"] == "fp32"
    assert len(contract["classes"]) == 10 and contract["classes"][0] == "T-shirt/top"


CORRUPTED_EXPORT = """
import sys
import numpy as np, onnx
from onnx import numpy_helper
import export.main as export_main
write_artifacts = export_main.write_artifacts

def corrupted(opts):  # the real artifacts, then every ONNX weight 0.1% off: small, but far outside rtol 1e-5
    exported = write_artifacts(opts)
    model = onnx.load(str(exported.files["onnx"]))
    weights = [t for t in model.graph.initializer if t.name.endswith("weight")]
    assert weights
    for t in weights:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.001), t.name))
    onnx.save(model, str(exported.files["onnx"]))
    return exported

export_main.write_artifacts = corrupted
sys.exit(export_main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_corrupted_onnx_fails_parity_and_is_not_registered(runs, tmp_path):
    """`export.main.main` with registration on and the ONNX file corrupted between writing and parity.
    Export and the store listing each run in a fresh process with BENTOML_HOME set before bentoml is
    imported, so the store checked is the one a wrong registration would have written to, whatever
    imported bentoml earlier in this pytest process."""
    home = tmp_path / "bentoml"
    done = zygote.run(["-c", CORRUPTED_EXPORT, "--checkpoint", str(runs / "product" / "best.pt"),
                       "--out", str(tmp_path / "export"), "--format", "onnx"], REPO, {**ENV, "BENTOML_HOME": str(home)})
    assert done.returncode == 1, done.stderr[-3000:]
    found = re.fullmatch(r"error: parity failed for onnx at batch (\d+): max abs error .* at input (\d+), .*; "
                         r"nothing registered \(details in parity\.json\)\n", done.stderr)
    assert found, done.stderr
    assert "registered  " not in done.stdout
    report = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert report["passed"] is False and all(not c["passed"] for c in report["checks"] if c["batch"] > 1)
    first = next(c for c in report["checks"] if not c["passed"])  # the message names the first failure
    assert (first["batch"], first["worst_index"]) == tuple(map(int, found.groups()))
    assert store_entries(home) == []


@pytest.mark.slow
def test_cli_registers_with_metadata(runs, tmp_path):
    home = tmp_path / "bentoml"
    ckpt = runs / "product" / "best.pt"
    done = export_cli(["--checkpoint", str(ckpt), "--out", str(tmp_path / "export")], home)
    assert done.returncode == 0, done.stderr
    assert "registered  product:" in done.stdout and "Traceback" not in done.stderr
    (entry,) = store_entries(home)
    assert entry["tag"].startswith("product:") and entry["tag"] in done.stdout
    assert entry["labels"]["task"] == "product" and entry["labels"]["kind"] == "regression"
    assert entry["files"] == ["contract.json", "model.onnx", "model.torchscript.pt", "model.yaml", "parity.json"]
    meta = entry["metadata"]
    loaded = load_checkpoint(ckpt)
    import hashlib

    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["task"] == "product" and meta["contract"]["inputs"][0]["name"] == "x"
    assert meta["normalization"] == loaded["normalization"]
    assert meta["training_metrics"] == pytest.approx(loaded["metrics"])
    assert meta["parity"]["passed"] is True and set(meta["parity"]["worst"]) == {"onnx", "torchscript"}
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"] == torch.__version__
    assert set(meta["versions"]) >= {"onnx", "onnxruntime", "bentoml"}


@pytest.mark.slow
def test_onnx_runs_without_torch_and_torchscript_in_a_fresh_process(runs, tmp_path):
    out = tmp_path / "export"
    assert main(["--checkpoint", str(runs / "product" / "best.pt"), "--out", str(out), "--no-register",
                 "--batch-sizes", "4"]) == 0
    x = np.array([[1.5, 2.0], [3.0, 4.0], [9.9, 9.9], [5.0, 1.0]], dtype=np.float32)
    eager = predictor_from_checkpoint(load_checkpoint(runs / "product" / "best.pt"), TASKS["product"])
    with torch.no_grad():
        want = eager(torch.from_numpy(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    onnx_only = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(out / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        f"y = s.run(['y'], {{'x': np.load({str(tmp_path / 'x.npy')!r})}})[0]\n"
        "assert 'torch' not in sys.modules, 'onnxruntime path imported torch'\n"
        "print(repr(y.ravel().tolist()))\n")
    done = subprocess.run([sys.executable, "-c", onnx_only], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(eval(done.stdout), want.ravel(), atol=1e-4, rtol=1e-5)
    script = (f"import torch, numpy as np\nm = torch.jit.load({str(out / 'model.torchscript.pt')!r})\n"
              f"print(repr(m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).ravel().tolist()))\n")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(eval(done.stdout), want.ravel(), atol=1e-5, rtol=1e-6)


def test_random_images_when_test_set_is_missing(runs, tmp_path):
    out = tmp_path / "export"
    (tmp_path / "empty").mkdir()  # a folder without the IDX files (a folder that does not exist is an error)
    assert main(["--format", "onnx", "--checkpoint", str(runs / "mlp" / "best.pt"), "--out", str(out),
                 "--no-register", "--batch-sizes", "1,7", "--data-dir", str(tmp_path / "empty")]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["inputs"].startswith("7 random inputs, uniform in [0, 1], seed 20261123 "
                                                            "(test data unavailable: no FashionMNIST IDX files")


@pytest.fixture
def bad_files(tmp_path, runs):
    (tmp_path / "noise.pt").write_bytes(os.urandom(512))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    ckpt = load_checkpoint(runs / "product" / "best.pt")
    ckpt["state_dict"] = {k: torch.full_like(v, float("nan")) if k.endswith("weight") else v
                          for k, v in ckpt["state_dict"].items()}
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, tmp_path / "nan.pt")
    return tmp_path


BAD = {
    "missing checkpoint": (["--checkpoint", "{tmp}/missing.pt"], "checkpoint {tmp}/missing.pt does not exist", 2),
    "random bytes": (["--checkpoint", "{tmp}/noise.pt"], "cannot read checkpoint {tmp}/noise.pt", 2),
    "foreign checkpoint": (["--checkpoint", "{tmp}/foreign.pt"], "is not a train-to-deploy checkpoint", 2),
    "NaN weights": (["--checkpoint", "{tmp}/nan.pt"], "non-finite weights", 2),
    "unknown format": (["--format", "tflite"], "argument --format: invalid choice: 'tflite'", 2),
    "bad batch sizes": (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers", 2),
    "negative tolerance": (["--atol", "-1"], "--atol must be a non-negative number", 2),
}


@pytest.mark.parametrize("name", BAD)
def test_user_errors_are_one_line(bad_files, capsys, name):
    args, message, code = BAD[name]
    args = [a.format(tmp=bad_files) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(bad_files / "noise.pt")]
    assert main([*args, "--out", str(bad_files / "out"), "--no-register"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message.format(tmp=bad_files) in err, err
    assert not (bad_files / "out" / "model.onnx").exists()


@pytest.mark.slow
def test_default_checkpoint_missing_from_the_command_line(tmp_path):
    done = zygote.run(["-m", "export"], tmp_path, ENV, 120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: no checkpoint at runs/product/best.pt: train one with `python -m train` "
                                   "or pass --checkpoint PATH")


def resaved(src, dst, **fields):
    """The checkpoint at `src` with `fields` replaced, saved in our format at `dst`."""
    ckpt = load_checkpoint(src)
    ckpt.update(fields)
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, dst)
    return dst


def test_contract_comes_from_the_weights_not_the_descriptive_fields(runs, tmp_path):
    """A checkpoint's input_shape and normalization lists are for people: the contract is built from the
    architecture and the weights that loading validated, so edited lists cannot misdescribe the graph."""
    real = load_checkpoint(runs / "product" / "best.pt")["normalization"]
    path = resaved(runs / "product" / "best.pt", tmp_path / "edited.pt", input_shape=[999],
                   normalization={"input": "junk", "target": {"mean": [1e9], "std": [0.0]}})
    assert main(["--checkpoint", str(path), "--out", str(tmp_path / "out"), "--no-register"]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "model.onnx")).metadata_props}
    contract = json.loads(props["contract"])
    assert contract["inputs"][0]["shape"] == ["batch", 2]
    assert contract["normalization"] == real  # the same float32 buffers, as lists


@pytest.mark.parametrize("classes", [None, ["a", "b"], {"0": "x"}, list(range(10))])
def test_contract_classes_are_the_tasks_not_the_checkpoints(runs, tmp_path, classes):
    """A checkpoint's classes list is for people, like its input_shape: the contract's class names come from the
    task, which declares one per output (t2d.Task refuses a classifier without them)."""
    path = resaved(runs / "cnn" / "best.pt", tmp_path / "classes.pt", classes=classes)
    assert main(["--format", "onnx", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--no-register",
                 "--batch-sizes", "2"]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "model.onnx")).metadata_props}
    contract = json.loads(props["contract"])
    assert contract["classes"] == list(TASKS["fashion-mnist"].classes)


class Sleepy(torch.nn.Module):
    """A network that takes 70 ms a call whatever the batch: slow, as a real-size model is, at no cost here."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        import time

        time.sleep(0.07)
        return self.linear(x)


def test_the_large_parity_batch_is_sized_to_the_model():
    from export.parity import LARGE_BATCH, LARGE_BATCH_SECONDS, large_batch

    task = TASKS["product"]
    fast = large_batch(predictor("product", "product_mlp"), task)
    assert fast["rows"] == LARGE_BATCH and fast["why"] == "the default"
    slow = large_batch(Sleepy(), task)  # 10 ms a row at batch 7: 1024 rows would be 10 s
    assert 8 <= slow["rows"] <= LARGE_BATCH_SECONDS / 0.01 and slow["eager_seconds_per_row"] >= 0.01
    assert "1024 rows would take the eager model about" in slow["why"]


def checkpoint_format(path) -> dict:
    """What a checkpoint file holds, without the values: its keys and each weight's shape, dtype and layout."""
    ckpt = load_checkpoint(path)
    weights = {k: (tuple(v.shape), v.dtype, v.is_contiguous()) for k, v in ckpt["state_dict"].items()}
    return {"keys": sorted(ckpt), "weights": weights, "resume": sorted(ckpt["resume"])}


def export_format(out) -> dict:
    """What an export folder holds, without the values: its files, the ONNX graph's inputs and outputs, the contract."""
    graph = onnx.load(str(out / "model.onnx")).graph
    io = [(v.name, str(v.type.tensor_type)) for v in (*graph.input, *graph.output)]
    return {"files": sorted(p.name for p in out.iterdir()), "io": io, "nodes": sorted(n.op_type for n in graph.node)}


@pytest.mark.slow
def test_channels_last_and_compile_change_neither_the_checkpoint_nor_the_export(runs, tmp_path):
    """The CNN trained contiguous (run.channels_last off) against the default on CPU (on); the product MLP trained
    through torch.compile against eager. Same checkpoint and export formats, parity for each."""
    images = runs / "idx"
    contiguous = train(["--task", "fashion-mnist", "--data-dir", str(images), "--data.download", "false",
                        "--data.val_size", "50", "--epochs", "1", "--model.arch", "cnn",
                        "--model.channels", "[4, 8, 8]", "--run.channels_last", "off"], tmp_path / "cnn")
    compiled = train([*PRODUCT, "--epochs", "3", "--run.compile", "true"], tmp_path / "product")
    assert contiguous["channels_last"] is False and compiled["compile"] is True
    assert json.loads((runs / "cnn" / "summary.json").read_text())["channels_last"] is True  # CPU default
    assert compiled["cpu"]["model"] and "vnni" in compiled["cpu"]  # the figures name their machine
    for mine, default in ((tmp_path / "cnn", runs / "cnn"), (tmp_path / "product", runs / "product")):
        assert checkpoint_format(mine / "best.pt") == checkpoint_format(default / "best.pt")
        assert all(fmt[2] for fmt in checkpoint_format(mine / "best.pt")["weights"].values())  # saved contiguous
    # The same steps in either layout: the same weights up to float32 rounding (measured: 4e-6 after 6 Adam steps).
    a, b = (load_checkpoint(p / "cnn" / "best.pt")["state_dict"] for p in (tmp_path, runs))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    for name in ("cnn", "product"):
        assert main(["--checkpoint", str(tmp_path / name / "best.pt"), "--out", str(tmp_path / name / "export"),
                     "--no-register", "--format", "onnx"]) == 0
        assert main(["--checkpoint", str(runs / name / "best.pt"), "--out", str(tmp_path / name / "default"),
                     "--no-register", "--format", "onnx"]) == 0
        assert json.loads((tmp_path / name / "export" / "parity.json").read_text())["passed"]
        assert export_format(tmp_path / name / "export") == export_format(tmp_path / name / "default")


# --- ensembles: several runs exported as one model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def second(runs):
    """Second runs of the product MLP and the image MLP, with other seeds than the `runs` fixture's."""
    image_args = ["--task", "fashion-mnist", "--data-dir", str(runs / "idx"), "--data.download", "false",
                  "--data.val_size", "50", "--epochs", "1", "--model.arch", "mlp"]
    train([*PRODUCT, "--epochs", "3", "--seed", "1"], runs / "product-1")
    train([*image_args, "--seed", "1"], runs / "mlp-1")
    return runs


def eager_outputs(paths, task: str, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [predictor_from_checkpoint(load_checkpoint(p), TASKS[task])(x) for p in paths]


def onnx_output(out, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_an_ensemble_of_regressions_answers_the_members_mean(second, tmp_path, capsys):
    paths = [second / "product" / "best.pt", second / "product-1" / "best.pt"]
    out = tmp_path / "export"
    assert main(["--checkpoint", *map(str, paths), "--out", str(out), "--no-register", "--batch-sizes", "1,7"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["members"] == list(map(str, paths))
    assert f"ensemble    2 runs, their answers averaged: {paths[0]}, {paths[1]}" in capsys.readouterr().out
    x = torch.tensor([[1.5, 2.0], [3.0, 4.0], [-2.0, 0.5]])
    a, b = eager_outputs(paths, "product", x)
    assert (a - b).abs().max() > 1e-3  # different runs: an average that ignored one member would show
    np.testing.assert_allclose(onnx_output(out, x), ((a + b) / 2).numpy(), atol=1e-5, rtol=1e-5)


def test_an_ensemble_of_classifiers_averages_the_probabilities(second, tmp_path):
    paths = [second / "mlp" / "best.pt", second / "mlp-1" / "best.pt"]
    out = tmp_path / "export"
    assert main(["--format", "onnx", "--checkpoint", *map(str, paths), "--out", str(out), "--no-register",
                 "--batch-sizes", "1,7"]) == 0
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    a, b = eager_outputs(paths, "fashion-mnist", x)
    logits = torch.from_numpy(onnx_output(out, x))
    mean = (a.softmax(1) + b.softmax(1)) / 2
    torch.testing.assert_close(logits.softmax(1), mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(16), atol=1e-5, rtol=1e-5)  # log-probabilities
    assert not torch.allclose(mean, ((a + b) / 2).softmax(1), atol=1e-4)  # not the same as averaging logits


def test_an_ensemble_quantizes_behind_the_gate(second, tmp_path):
    """--quantize measures the ensemble's one graph: its fp16 variant passes the gate and still answers the members'
    mean, nearer to it than to either member."""
    import onnxruntime as ort

    paths = [second / "product" / "best.pt", second / "product-1" / "best.pt"]
    out = tmp_path / "export"
    assert main(["--format", "onnx", "--checkpoint", *map(str, paths), "--out", str(out), "--no-register",
                 "--batch-sizes", "1,7", "--quantize", "fp16"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["passed"] and report["file"] == str(out / "model.fp16.onnx")
    x = torch.tensor([[1.5, 2.0], [3.0, 4.0], [-2.0, 0.5], [0.5, -3.0]])
    a, b = (t.numpy() for t in eager_outputs(paths, "product", x))
    session = ort.InferenceSession(report["file"], providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    off = np.abs(y - (a + b) / 2)
    assert np.all(off < np.abs(a - b) / 4), (y, a, b)


def test_an_ensemble_needs_different_runs_of_one_task(second, tmp_path, capsys):
    product, mlp = str(second / "product" / "best.pt"), str(second / "mlp" / "best.pt")
    for args, message in (([product, product], f"--checkpoint names the same weights twice ({product} and {product})"),
                          ([product, mlp], f"checkpoint {mlp} was trained on task 'fashion-mnist', not 'product'"),
                          ([product, str(tmp_path / "nope.pt")], f"checkpoint {tmp_path}/nope.pt does not exist")):
        assert main(["--checkpoint", *args, "--out", str(tmp_path / "out"), "--no-register"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_an_ensemble_s_store_entry_lists_its_members(second, tmp_path):
    """What registration stores for an ensemble (`store_metadata`, as test_cli_registers_with_metadata checks it
    for one run through a real store): the members' own facts, none of them passed off as the model's."""
    import hashlib

    from export.main import parse_args, run_record, store_metadata, verify, write_artifacts

    paths = [second / "product" / "best.pt", second / "product-1" / "best.pt"]
    opts = parse_args(["--checkpoint", *map(str, paths), "--out", str(tmp_path / "export"), "--format", "onnx",
                       "--batch-sizes", "1,7"])
    exp = write_artifacts(opts)
    meta = store_metadata(exp, verify(exp, opts), opts, run_record(exp))
    summaries = [json.loads((p.parent / "summary.json").read_text()) for p in paths]
    assert meta["arch"] == "ensemble of 2: product_mlp, product_mlp" and meta["training_metrics"] == {}
    assert meta["epoch"] is None and meta["checkpoint_sha256"] is None and meta["test_metrics"] is None
    assert meta["train_seconds"] == pytest.approx(sum(s["train_seconds"] for s in summaries))
    for m, path, summary in zip(meta["members"], paths, summaries):
        assert m["checkpoint"] == str(path) and m["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert m["epoch"] == load_checkpoint(path)["epoch"] and m["test_metrics"] == pytest.approx(summary["test"])
    assert meta["parameters"] == 2 * sum(p.numel() for p in predictor("product", "product_mlp").parameters())
