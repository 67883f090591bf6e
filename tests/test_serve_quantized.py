"""A quantized model in service: `python -m export --quantize int8` registers the int8 variant of the
Fashion-MNIST export beside its float32 entry; a real `bentoml serve` serves it (the newest), says which
variant it is, and answers within the agreement the export measured; `T2D_MODELS=name@variant` pins a variant.
At load the server runs each variant on its stored self-check rows and refuses one that disagrees here.
"""

import io
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from serving import REPO, Server, copy_store, entry_folder, env_for, exported
import zygote

from t2d import selfcheck
from t2d.cpu import cpu_info, describe
from t2d.idx import images_and_labels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = exported(tmp_path_factory)
    home = copy_store(base, tmp_path_factory.mktemp("quantized") / "bentoml")
    out = home.parent / "export-int8"
    # The tiny model's 100 test images make one image a whole point: the bound is loose on purpose,
    # the gate's own tests are in test_quantize.py.
    run = zygote.run(["-m", "export", "--quantize", "int8", "--max-accuracy-drop", "20",
                      "--checkpoint", str(base.root / "fashion-mnist" / "best.pt"), "--out", str(out)],
                     REPO, env_for(home), 600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "quantization.json").read_text())
    entries = sorted((p for p in (home / "models" / "fashion-mnist").iterdir() if p.is_dir()),
                     key=lambda p: p.stat().st_mtime)  # oldest first
    variants = {p.name: json.loads((p / "contract.json").read_text())["variant"] for p in entries}
    int8 = next(v for v, variant in variants.items() if variant == "int8")
    # The quantizing export registers its own float32 entry first, then the int8 one: 2 fp32 entries now.
    newest_fp32 = [v for v, variant in variants.items() if variant == "fp32"][-1]
    assert list(variants.values()).count("fp32") == 2
    return base, home, report, f"fashion-mnist:{int8}", newest_fp32


def test_the_newest_variant_is_served_and_says_what_it_is(store):
    base, home, report, int8_tag, _ = store
    server = Server(home, home.parent / "serve.log").wait_ready()
    try:
        meta = server.expect(server.get("/v2/models/fashion-mnist"), 200)
        assert meta["versions"] == [int8_tag.split(":")[1]] and meta["parameters"] == {"variant": "int8"}
        assert server.expect(server.get("/v2/models/product"), 200)["parameters"] == {"variant": "fp32"}
        # the test split the gate measured on, through HTTP
        idx = base.root / "idx"
        x, y = images_and_labels(idx / "t10k-images-idx3-ubyte.gz", idx / "t10k-labels-idx1-ubyte.gz")
        x = x.numpy()
        served = []
        for chunk in np.split(x, range(40, len(x), 40)):  # 40 images of JSON stay under the 1 MiB body limit
            body = {"inputs": [{"name": "image", "shape": list(chunk.shape), "datatype": "FP32",
                                "data": chunk.ravel().tolist()}]}
            answer = server.expect(server.post("/v2/models/fashion-mnist/infer", body), 200)
            assert answer["parameters"] == {"variant": "int8"}
            served.append(np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(len(chunk), -1))
        served = np.concatenate(served)
        log = server.log()
    finally:
        server.stop()
    assert f"model {int8_tag} (int8) passed its self-check on {describe()}" in log
    direct = ort.InferenceSession(str(entry_folder(home, int8_tag) / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(served, direct.run(None, {"image": x})[0], rtol=1e-6, atol=1e-6)
    fp32 = ort.InferenceSession(str(entry_folder(home, base.tags["fashion-mnist"]) / "model.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    agreement = float((served.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= report["gate"]["agreement"] - 1e-9, (agreement, report["gate"])
    accuracy = 100 * float((served.argmax(1) == y.numpy()).mean())
    assert accuracy == pytest.approx(report["gate"]["quantized_accuracy"])


def test_a_variant_can_be_pinned(store):
    base, home, _, int8_tag, newest_fp32 = store
    server = Server(home, home.parent / "pinned.log", T2D_MODELS="fashion-mnist@fp32").wait_ready()
    try:
        meta = server.expect(server.get("/v2/models/fashion-mnist"), 200)
        # the newest fp32 entry, though an int8 one is newer still
        assert meta["versions"] == [newest_fp32] != [int8_tag.split(":")[1]]
        assert meta["parameters"] == {"variant": "fp32"}
    finally:
        server.stop()
    server = Server(home, home.parent / "missing.log", T2D_MODELS="product@int8").wait_ready(path="/livez")
    try:
        assert server.get("/readyz").status == 503  # a pin that cannot be served holds readiness back
        reply = server.get("/v2/models/product/ready")
        assert reply.status != 200
        assert "no int8 entry of model product" in server.log()
    finally:
        server.stop()


def rewrite_self_check(folder, edit):
    """The entry's selfcheck.npz with `edit(arrays)` applied to its arrays (meta as a dict)."""
    path = folder / selfcheck.FILE
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    edit(arrays, meta)
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def test_a_variant_that_disagrees_here_is_refused_and_the_float_model_can_be_pinned(store, tmp_path):
    """The int8 entry's stored float answers are made to disagree with it (each row's logits rolled by one class,
    so every argmax moves): the server refuses the variant, says so in one log line with this CPU's flags and the
    measured agreement, holds readiness back, and serves the float model when pinned to it."""
    _, home, report, int8_tag, newest_fp32 = store
    broken = tmp_path / "bentoml"
    shutil.copytree(home, broken)
    folder = entry_folder(broken, int8_tag)
    key = f"float:{report['self_check']['output']}"
    rewrite_self_check(folder, lambda arrays, meta: arrays.update({key: np.roll(arrays[key], 1, axis=1)}))
    server = Server(broken, tmp_path / "refused.log").wait_ready(path="/livez")
    try:
        assert server.get("/readyz").status == 503
        reply = server.get("/v2/models/fashion-mnist")
        assert reply.status == 503 and "failed its self-check on this CPU" in reply.json["error"]
        assert "T2D_MODELS=fashion-mnist@fp32" in reply.json["error"]
        assert server.expect(server.get("/v2/models/product"), 200)  # the other models are served
        log = server.log()
    finally:
        server.stop()
    lines = [line for line in log.splitlines() if "self-check:" in line]
    assert len(lines) == 1, log
    assert f"stored rows here, {report['self_check']['agreement']:.1%} where it was exported" in lines[0]
    assert describe() in lines[0] and all(flag in lines[0] for flag in cpu_info()["flags"])
    server = Server(broken, tmp_path / "pinned.log", T2D_MODELS="fashion-mnist@fp32").wait_ready()
    try:
        meta = server.expect(server.get("/v2/models/fashion-mnist"), 200)
        assert meta["versions"] == [newest_fp32] and meta["parameters"] == {"variant": "fp32"}
    finally:
        server.stop()


def test_a_variant_for_vnni_cpus_is_refused_where_there_is_none(store, tmp_path):
    """A variant that records it needs VNNI is served only on a CPU that has it (this machine's answer either way)."""
    _, home, _, int8_tag, _ = store
    copy = tmp_path / "bentoml"
    shutil.copytree(home, copy)
    rewrite_self_check(entry_folder(copy, int8_tag), lambda arrays, meta: meta.update(requires_vnni=True))
    server = Server(copy, tmp_path / "vnni.log").wait_ready(path="/livez")
    try:
        ready = server.get("/readyz").status
        log = server.log()
    finally:
        server.stop()
    if cpu_info()["vnni"]:
        assert ready == 200 and "passed its self-check" in log
    else:
        assert ready == 503 and "quantized for CPUs with VNNI and this CPU has none" in log
