"""`python -m export --quantize int8|fp16`: real onnxruntime quantization of small real models, and the gate.

Checkpoints come from real (tiny) training runs. A fragile model is made by editing trained weights
so that the float function is unchanged but int8 rounding destroys it: one hidden unit gets an
activation 10,000 times the others' and no outgoing weight, so a per-tensor int8 scale that must
cover it rounds every other unit to zero. Registration runs in a subprocess with its own BENTOML_HOME
(BentoML reads it once, at import), as in test_export.py.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import PRODUCT, REPO, one_error_line, predictor, train, write_image_set
from serving import export_cli, store_entries

import t2d
from export.main import main
from export.artifacts import write_onnx
from export.contract import contract_of
from export.quantize import CALIBRATION_SEED, calibration_inputs, fold_batchnorm_through_maxpool
from models.checkpoint import load_checkpoint, save_checkpoint

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true"}
QUICK = ["--format", "onnx", "--batch-sizes", "1,7"]  # parity as usual, fewer and smaller batches


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A briefly trained product MLP (L-BFGS, test MRE about 3%), and a small CNN that learned the tiny IDX set
    (100% test accuracy)."""
    root = tmp_path_factory.mktemp("quantize")
    images = write_image_set(root / "idx", n_train=600, n_test=300)
    train([*PRODUCT, "--epochs", "6", "--optim.name", "lbfgs"], root / "product")
    train(["--task", "fashion-mnist", "--data-dir", str(images), "--data.download", "false", "--data.val_size", "50",
           "--epochs", "4", "--model.arch", "cnn", "--model.channels", "[4, 8, 8]", "--optim.lr", "0.01",
           "--data.batch_size", "32"], root / "cnn")
    return root


def edited(src, dst, edit):
    """The checkpoint at `src` with `edit(state_dict)` applied, saved in our format at `dst`."""
    ckpt = load_checkpoint(src)
    sd = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    edit(sd)
    ckpt["state_dict"] = sd
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, dst)
    return dst


def outlier_product_unit(sd):
    # Hidden unit 0 of the first layer: 10^4 times the pre-activation, and no weight out of it.
    sd["net.layers.0.weight"][0] *= 1e4
    sd["net.layers.0.bias"][0] *= 1e4
    sd["net.layers.2.weight"][:, 0] = 0


def outlier_cnn_channel(sd):
    # Channel 0 of the first block: a constant 10^4 after BatchNorm and ReLU, and no weight out of it.
    sd["net.features.0.1.weight"][0] = 0
    sd["net.features.0.1.bias"][0] = 1e4
    sd["net.features.1.0.weight"][:, 0] = 0


FRAGILE = {"product": outlier_product_unit, "cnn": outlier_cnn_channel}


def image_args(runs):
    return ["--data-dir", str(runs / "idx")]


# --- the gate passes good models, in-process and fast ------------------------------------------------------------


@pytest.mark.slow
def test_int8_static_classifier_passes_and_writes_its_numbers(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["--checkpoint", str(runs / "cnn" / "best.pt"), "--out", str(out), "--no-register", *QUICK,
                 *image_args(runs), "--quantize", "int8"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["passed"] and report["variant"] == "int8" and report["method"] == "static"
    assert report["calibration"]["split"] == "train" and report["calibration"]["samples"] == 512
    assert report["eval_data"]["samples"] == 300  # the whole test split
    g = report["gate"]
    assert g["float_accuracy"] == pytest.approx(100.0) and g["accuracy_drop"] <= 0.5 and g["agreement"] >= 0.99
    # The numbers, recomputed here from the int8 file on every test image.
    from t2d.idx import images_and_labels

    x, y = images_and_labels(runs / "idx" / "t10k-images-idx3-ubyte.gz", runs / "idx" / "t10k-labels-idx1-ubyte.gz")
    q = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    predicted = q.run(None, {"image": x.numpy()})[0].argmax(1)
    assert g["quantized_accuracy"] == pytest.approx(100 * float((predicted == y.numpy()).mean()))
    # A real QDQ int8 graph, not a copy of the float one: int8 weights and QuantizeLinear nodes.
    model = onnx.load(str(out / "model.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    contract = json.loads({p.key: p.value for p in model.metadata_props}["contract"])
    assert contract["variant"] == "int8"
    assert report["size_bytes"]["int8"] == (out / "model.int8.onnx").stat().st_size
    printed = capsys.readouterr().out
    assert "int8 " in printed and "static portable: test accuracy 100.00% vs 100.00% float32" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx", "parity.json",
                                                     "quantization.json", "selfcheck.npz"]


def test_int8_dynamic_regression_passes(runs, tmp_path):
    out = tmp_path / "export"
    assert main(["--checkpoint", str(runs / "product" / "best.pt"), "--out", str(out), "--no-register", *QUICK,
                 "--quantize", "int8"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["passed"] and report["method"] == "dynamic" and report["calibration"] is None
    # A dynamic graph's row depends on its batch: measured alone and in a full batch, gated on the worse.
    assert [r["batch"] for r in report["by_batch"]] == [1, 1024]
    g = report["gate"]
    assert g["quantized_mre"] <= 1.10 * g["float_mre"] and g["quantized_mre"] != g["float_mre"]
    assert g["quantized_mre"] == max(r["quantized_mre"] for r in report["by_batch"])
    # The numbers, recomputed here from the two files on the run's test set.
    x, y = t2d.builtin_tasks()["product"].data(t2d.DataOptions(size=256, val_size=64, test_size=256)).test
    f32, q = (ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
              for f in ("model.onnx", "model.int8.onnx"))
    ref = f32.run(None, {"x": x.numpy()})[0].astype(np.float64)
    got = np.concatenate([q.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))]).astype(np.float64)
    by_batch = {r["batch"]: r for r in report["by_batch"]}
    mre = lambda p: 100 * float((np.abs(p - y.numpy()) / np.abs(y.numpy())).mean())  # noqa: E731
    assert by_batch[1]["float_mre"] == pytest.approx(mre(ref), rel=1e-6)
    assert by_batch[1]["quantized_mre"] == pytest.approx(mre(got), rel=1e-6)
    rel = np.abs(got - ref) / np.abs(ref)
    assert by_batch[1]["agreement"] == pytest.approx(float((rel <= 0.01).mean()))
    assert by_batch[1]["max_rel_diff"] == pytest.approx(float(rel.max()), rel=1e-6)
    assert report["eval_data"]["samples"] == 256  # the run's test set (PRODUCT trains with data.test_size 256)
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops


@pytest.mark.parametrize("arch", ["product", "cnn"])
def test_fp16_keeps_float32_io_and_passes(runs, tmp_path, arch):
    out = tmp_path / "export"
    extra = image_args(runs) if arch == "cnn" else []
    assert main(["--checkpoint", str(runs / arch / "best.pt"), "--out", str(out), "--no-register", *QUICK, *extra,
                 "--quantize", "fp16"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["passed"] and report["method"] == "fp16"
    model = onnx.load(str(out / "model.fp16.onnx"))
    onnx.checker.check_model(model, full_check=True)
    float_io = [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]
    assert float_io == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]  # the contract, unchanged
    weights = [t for t in model.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    s = ort.InferenceSession(str(out / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    shape = [1, 2] if arch == "product" else [1, 1, 28, 28]
    x = np.full(shape, 0.5 if arch == "cnn" else 3.0, dtype=np.float32)
    (y,) = s.run(None, {s.get_inputs()[0].name: x})
    assert y.dtype == np.float32


# --- the gate refuses a fragile model -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["product", "cnn"])
def test_gate_refuses_a_model_int8_destroys(runs, tmp_path, capsys, arch):
    """The edited checkpoint computes the trained function (parity passes on it), but int8 loses it."""
    path = edited(runs / arch / "best.pt", tmp_path / "fragile.pt", FRAGILE[arch])
    out = tmp_path / "export"
    extra = image_args(runs) if arch == "cnn" else []
    assert main(["--checkpoint", str(path), "--out", str(out), "--no-register", *QUICK, *extra,
                 "--quantize", "int8", "--no-int8-fallback"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: int8 model refused: test "), err
    assert err.rstrip().endswith("nothing registered (details in quantization.json)")
    assert json.loads((out / "parity.json").read_text())["passed"]  # the float model itself is fine
    report = json.loads((out / "quantization.json").read_text())
    g = report["gate"]
    assert not report["passed"] and not g["passed"]
    if arch == "product":
        assert g["quantized_mre"] > 1.10 * g["float_mre"]
        assert f"{g['quantized_mre']:.4g}%" in err and "--max-error-increase 10%" in err
    else:
        assert g["accuracy_drop"] > 0.5 and g["float_accuracy"] == pytest.approx(100.0)
        assert f"{g['quantized_accuracy']:.2f}%" in err and "--max-accuracy-drop 0.5" in err


@pytest.mark.slow
def test_the_bound_is_the_users(runs, tmp_path):
    """The same fragile product model passes when the user allows what it loses, and not below that."""
    path = edited(runs / "product" / "best.pt", tmp_path / "fragile.pt", outlier_product_unit)
    out = tmp_path / "export"
    args = ["--checkpoint", str(path), "--out", str(out), "--no-register", *QUICK, "--quantize", "int8",
            "--no-int8-fallback"]
    assert main([*args, "--max-error-increase", "1e6"]) == 0
    increase = json.loads((out / "quantization.json").read_text())["gate"]["error_increase"]
    assert increase > 10
    assert main([*args, "--max-error-increase", str(increase * 0.99)]) == 1
    assert main([*args, "--max-error-increase", str(increase * 1.01)]) == 0


# --- BatchNorm after pooling is folded into the convolution for int8, exactly ---------------------------------


@pytest.mark.parametrize("negative_channel", [False, True])
def test_batchnorm_folds_through_maxpool_only_where_exact(tmp_path, negative_channel):
    """pool_first CNN blocks (conv, pool, BatchNorm, ReLU) become conv', ReLU, pool with the same outputs; a
    channel whose BatchNorm scale is negative does not commute with max, so its block is left alone."""
    torch.manual_seed(0)
    model = predictor("fashion-mnist", "cnn", {"channels": [4, 8, 8], "pool_first": True, "hidden": 16}).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if negative_channel:
        first_bn.weight.data[1] = -0.7
    task = t2d.builtin_tasks()["fashion-mnist"]
    write_onnx(model, task, contract_of(task, model), tmp_path / "model.onnx", {})
    original = onnx.load(str(tmp_path / "model.onnx"))
    folded = onnx.load(str(tmp_path / "model.onnx"))
    assert fold_batchnorm_through_maxpool(folded) == (2 if negative_channel else 3)
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("BatchNormalization") == (1 if negative_channel else 0)
    assert ops.count("MaxPool") == 3 and ops.count("Conv") == 3
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"image": x})[0]
    want, got = run(original), run(folded)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --- calibration reads the training split only -------------------------------------------------------------------

def test_calibration_never_touches_the_test_split(user_task, tmp_path):
    ckpt = {"config": {"run": {"seed": 0}, "data": {}}}
    user_task.FORBID_TEST = True  # any len() or item of the test split raises
    x, source = calibration_inputs(user_task.TASK, ckpt, 100, None)
    assert x.shape == (100, 6) and "training split" in source
    picked = torch.randperm(400, generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:100].sort().values
    assert user_task.ACCESS == [("train", i) for i in picked.tolist()]
    train_x = user_task.data(t2d.DataOptions()).train.x
    np.testing.assert_array_equal(x, train_x[picked].numpy())  # the very training rows, in order
    again, _ = calibration_inputs(user_task.TASK, ckpt, 100, None)
    np.testing.assert_array_equal(again, x)  # seeded: the same sample every time


def test_export_calibrates_on_train_and_measures_on_test(user_task, tmp_path):
    """The whole command, a user's task: parity and the gate read the test split, calibration only train."""
    train(["--task", "recorded_task:TASK"], tmp_path / "run")
    del user_task.ACCESS[:]
    out = tmp_path / "export"
    assert main(["--task", "recorded_task:TASK", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(out),
                 "--no-register", *QUICK, "--quantize", "int8", "--calibration-samples", "64"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["passed"] and report["method"] == "static" and report["eval_data"]["samples"] == 150
    splits = [s for s, _ in user_task.ACCESS]
    first, last = splits.index("train"), len(splits) - 1 - splits[::-1].index("train")
    # One block of training reads between parity's and the gate's test reads: the 64 calibration samples, then
    # the per-layer selection's validation sample (the other 336 training samples: at most 1024).
    assert splits[first:last + 1] == ["train"] * 400 and splits.count("train") == 400
    calibration = torch.randperm(400, generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:64].sort().values
    assert [i for _, i in user_task.ACCESS[first:first + 64]] == calibration.tolist()
    validation = sorted(i for _, i in user_task.ACCESS[first + 64:last + 1])
    assert validation == sorted(set(range(400)) - set(calibration.tolist()))
    assert set(splits[:first]) == {"test"} and splits[last + 1:] == ["test"] * 150


# --- registration: two entries, the variant's graph under model.onnx ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch,variant", [("cnn", "int8"), ("product", "int8"), ("cnn", "fp16")])
def test_registers_float_and_variant_with_numbers(runs, tmp_path, arch, variant):
    home = tmp_path / "bentoml"
    extra = image_args(runs) if arch == "cnn" else []
    done = export_cli(["--checkpoint", str(runs / arch / "best.pt"), "--out", str(tmp_path / "export"), *QUICK,
                       *extra, "--quantize", variant], home)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = {e["labels"]["variant"]: e for e in store_entries(home)}
    assert sorted(entries) == sorted(["fp32", variant])
    f32, q = entries["fp32"], entries[variant]
    assert f"registered  {f32['tag']} (fp32)" in done.stdout and f"registered  {q['tag']} ({variant})" in done.stdout
    assert q["tag"].split(":")[0] == f32["tag"].split(":")[0] == ("fashion-mnist" if arch == "cnn" else "product")
    assert q["files"] == ["contract.json", "model.onnx", "model.yaml", "parity.json", "quantization.json",
                          "selfcheck.npz"]
    meta = q["metadata"]
    report = json.loads((tmp_path / "export" / "quantization.json").read_text())
    assert meta["variant"] == variant and meta["float_model"] == f32["tag"] and meta["parity"]["passed"]
    assert meta["quantization"]["gate"] == pytest.approx(report["gate"])
    assert json.loads(open(os.path.join(q["path"], "quantization.json")).read())["gate"] == report["gate"]
    contract = json.loads(open(os.path.join(q["path"], "contract.json")).read())
    assert contract["variant"] == variant and meta["contract"]["variant"] == variant
    assert json.loads(open(os.path.join(f32["path"], "contract.json")).read())["variant"] == "fp32"
    # What the server does: open model.onnx, feed the contract's input name, get the contract's output.
    s = ort.InferenceSession(os.path.join(q["path"], "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = contract["inputs"], contract["outputs"]
    x = np.random.default_rng(0).uniform(1, 10, size=(5, *inp["shape"][1:])).astype(np.float32)
    if arch == "cnn":
        x /= 10
    (y,) = s.run([outp["name"]], {inp["name"]: x})
    assert y.shape == (5, outp["shape"][1]) and y.dtype == np.float32
    with open(os.path.join(q["path"], "model.onnx"), "rb") as fh:
        assert fh.read() == (tmp_path / "export" / f"model.{variant}.onnx").read_bytes()


@pytest.mark.slow
def test_refused_variant_registers_nothing(runs, tmp_path):
    home = tmp_path / "bentoml"
    path = edited(runs / "cnn" / "best.pt", tmp_path / "fragile.pt", outlier_cnn_channel)
    done = export_cli(["--checkpoint", str(path), "--out", str(tmp_path / "export"), *QUICK, *image_args(runs),
                       "--quantize", "int8", "--no-int8-fallback"], home)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: int8 model refused: test accuracy"), done.stderr
    assert "Traceback" not in done.stderr and "registered" not in done.stdout
    assert store_entries(home) == []  # not the float model either


QUANT_ERRORS = {
    "torchscript only": (["--format", "torchscript", "--quantize", "int8"], "--quantize works on the ONNX model"),
    "unknown variant": (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    "negative bound": (["--quantize", "int8", "--max-accuracy-drop", "-1"], "--max-accuracy-drop must be"),
    "nan bound": (["--quantize", "int8", "--max-error-increase", "nan"], "--max-error-increase must be"),
    "no calibration": (["--quantize", "int8", "--calibration-samples", "0"], "--calibration-samples must be >= 1"),
}


@pytest.mark.parametrize("name", QUANT_ERRORS)
def test_quantize_user_errors_are_one_line(runs, tmp_path, capsys, name):
    args, message = QUANT_ERRORS[name]
    assert main(["--checkpoint", str(runs / "product" / "best.pt"), "--out", str(tmp_path / "out"),
                 "--no-register", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_data_to_measure_is_a_user_error(runs, tmp_path, capsys):
    """No test images here: parity falls back to random images, but the gate cannot measure: exit 2."""
    (tmp_path / "empty").mkdir()
    assert main(["--checkpoint", str(runs / "cnn" / "best.pt"), "--out", str(tmp_path / "out"), "--no-register",
                 *QUICK, "--data-dir", str(tmp_path / "empty"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize needs task fashion-mnist's data to calibrate" in err, err
    assert not (tmp_path / "out" / "model.int8.onnx").exists()


# --- the int8 format, and the per-layer fallback --------------------------------------------------------------

def dead_unit_feeds_a_huge_weight(first_w, first_b, second_w):
    """An edit that keeps the float function but that int8 cannot hold in one layer: unit 0 of a hidden layer never
    fires (weights scaled down 100 times, bias -10: ReLU gives 0), and the next layer weighs it 1,000 in every output
    channel, so each channel's int8 scale must cover 1,000 and rounds the channel's real weights (about 0.1-1) to
    zero. (All-zero weights would not do: a channel of zeros has no int8 scale, which breaks that layer too.)"""
    def edit(sd):
        sd[first_w][0] *= 0.01
        sd[first_b][0] = -10
        sd[second_w][:, 0] = 1e3
    return edit


# The layer that holds the huge weights, and how to make it: the product MLP's second Linear, the CNN's second conv
# (the first block's BatchNorm turns channel 0 off).
FRAGILE_LAYER = {
    "product": ("net.layers.2", dead_unit_feeds_a_huge_weight("net.layers.0.weight", "net.layers.0.bias",
                                                              "net.layers.2.weight")),
    "cnn": ("net.features.1.0", dead_unit_feeds_a_huge_weight("net.features.0.1.weight", "net.features.0.1.bias",
                                                              "net.features.1.0.weight")),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["product", "cnn"])
def test_fallback_keeps_exactly_the_fragile_layer_in_float(runs, tmp_path, arch):
    """A model whose one layer int8 cannot hold passes once that layer stays float32, and the selection keeps that
    layer and no other; without the fallback the gate refuses it."""
    layer, edit = FRAGILE_LAYER[arch]
    path = edited(runs / arch / "best.pt", tmp_path / "fragile.pt", edit)
    extra = image_args(runs) if arch == "cnn" else []
    args = ["--checkpoint", str(path), "--no-register", *QUICK, *extra, "--quantize", "int8"]
    assert main([*args, "--out", str(tmp_path / "off"), "--no-int8-fallback"]) == 1  # int8 throughout: refused
    out = tmp_path / "export"
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["passed"]
    assert [(k["module"], k["why"].split(":")[0]) for k in report["kept_float"]] == [(layer, "selected on validation")]
    trials = report["selection"]["trials"]
    assert trials[0]["kept_float"] == [] and not trials[0]["passed"]  # all int8 missed the bound on validation
    assert report["selection"]["validation"]["split"] == "train"
    # The kept layer is float in the graph: its weight is a float initializer, the others' are int8.
    kinds = {}
    for t in onnx.load(str(out / "model.int8.onnx")).graph.initializer:
        if ".weight" in t.name and "bias" not in t.name and not t.name.endswith(("_scale", "_zero_point")):
            kinds.setdefault(t.name.split(".weight")[0], set()).add(t.data_type)
    assert kinds.pop(layer) == {onnx.TensorProto.FLOAT}
    assert kinds and all(k <= {onnx.TensorProto.INT8, onnx.TensorProto.UINT8} for k in kinds.values()), kinds


def test_keep_float_pins_a_layer_by_hand_and_refuses_unknown_names(runs, tmp_path, capsys):
    out = tmp_path / "export"
    args = ["--checkpoint", str(runs / "product" / "best.pt"), "--out", str(out), "--no-register", *QUICK,
            "--quantize", "int8"]
    assert main([*args, "--keep-float", "net.layers.0"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert [(k["module"], k["why"]) for k in report["kept_float"]] == [("net.layers.0", "--keep-float")]
    assert [layer["module"] for layer in report["layers"]] == ["net.layers.0", "net.layers.2", "net.layers.4"]
    ops = {n.name: n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert "MatMulInteger" not in {ops.get(f"{report['kept_float'][0]['node']}_MatMul"),
                                   ops.get(report["kept_float"][0]["node"])}
    assert sum(op == "MatMulInteger" for op in ops.values()) == 2  # the other two layers are int8
    capsys.readouterr()
    assert main([*args, "--keep-float", "net.nope"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--keep-float net.nope: no quantizable layer" in line and "net.layers.2" in line


def test_selection_reads_the_training_split_only(user_task, tmp_path):
    """A user's task whose test split raises when read: calibration and the whole per-layer selection still run
    (they read the training split); only the gate, afterwards, reads the test split."""
    from export.quantize import QuantizeOptions, _int8

    train(["--task", "recorded_task:TASK"], tmp_path / "run")

    edit = dead_unit_feeds_a_huge_weight("net.fc1.weight", "net.fc1.bias", "net.fc2.weight")
    path = edited(tmp_path / "run" / "best.pt", tmp_path / "fragile.pt", edit)
    ckpt = load_checkpoint(path, task=user_task.TASK)
    out = tmp_path / "export"
    assert main(["--task", "recorded_task:TASK", "--checkpoint", str(path), "--out", str(out), "--no-register",
                 *QUICK]) == 0  # the float model
    user_task.FORBID_TEST = True
    del user_task.ACCESS[:]
    model, details = _int8(user_task.TASK, ckpt, out / "model.onnx", out, QuantizeOptions("int8"), None, "scores")
    assert [k["module"] for k in details["kept_float"]] == ["net.fc2"]
    assert {s for s, _ in user_task.ACCESS} == {"train"}


@pytest.mark.slow
def test_vnni_format_is_opt_in_and_recorded(runs, tmp_path):
    """portable (7-bit weights) by default; --int8-format vnni keeps full int8 weights and says it needs VNNI.
    quantization.json names the CPU and the latency of both models on it."""
    from t2d.cpu import cpu_info

    reports = {}
    for fmt in ("portable", "vnni"):
        out = tmp_path / fmt
        code = main(["--checkpoint", str(runs / "cnn" / "best.pt"), "--out", str(out), "--no-register", *QUICK,
                     *image_args(runs), "--quantize", "int8", "--int8-format", fmt, "--no-int8-fallback"])
        reports[fmt] = json.loads((out / "quantization.json").read_text())
        assert code == 0 or fmt == "vnni"  # full 8-bit weights may fail the gate on a CPU without VNNI
    portable, vnni = reports["portable"], reports["vnni"]
    assert portable["int8_format"] == "portable" and not portable["requires_vnni"]
    assert "reduce_range" in portable["weights"]
    assert vnni["int8_format"] == "vnni" and vnni["requires_vnni"] and "reduce_range" not in vnni["weights"]
    assert portable["cpu"] == cpu_info() and portable["cpu"]["model"]
    assert [lat["batch"] for lat in portable["latency"]] == [1, 300]
    assert all(lat["float32_ms"] > 0 and lat["quantized_ms"] > 0 and lat["calls"] >= 3 for lat in portable["latency"])
    weights = [numpy_weights(tmp_path / fmt / "model.int8.onnx") for fmt in ("portable", "vnni")]
    assert max(np.abs(w).max() for w in weights[0]) <= 64 < max(np.abs(w).max() for w in weights[1])


def numpy_weights(path):
    from onnx import numpy_helper

    return [numpy_helper.to_array(t).astype(np.int32) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
