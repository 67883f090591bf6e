"""Serving end to end: real `bentoml serve` processes answering real HTTP, on models that the real
`python -m export` registered in a temporary BentoML model store.

Every answer is checked against the eager PyTorch model of the same checkpoint (the service runs
onnxruntime and never imports torch). Every kind of bad request gets a 4xx JSON error and the
server keeps serving. An empty store answers 503 with the commands that fill it; a broken model
takes down only its own endpoints (and readiness); `bentoml build` makes a Bento that serves the
models it names. Helpers and the exported store: `serving`. Overload, timeouts, shutdown, unsafe
artifacts, fuzzing and a load test: `test_serve_reliability`.

The store holds good product and fashion-mnist exports and, registered after them, a product model
whose weights are scaled up 1e4-fold per layer (its outputs overflow float32 on large inputs) and an
`mnist` entry whose model.onnx is garbage. The main server pins the good ones (T2D_PRODUCT_MODEL,
T2D_CLASSIFIER_MODEL) and leaves the mnist name out (T2D_MODELS=-mnist); a second server, without pins,
serves the newest: the loud product and the broken classifier.
"""

import json
import pickle
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, class_images
from serving import Server, copy_store, entry_folder, env_for, exported, image_with, png, python, softmax

import t2d
from models.checkpoint import load_checkpoint, predictor_from_checkpoint
from serve.limits import MAX_BODY_BYTES, MAX_ROWS

# Nearly every test here talks to a `bentoml serve` process, and the module first trains and exports the
# store it serves: the fast tier (-m "not slow") leaves the module out.
pytestmark = pytest.mark.slow

TRAIN_RANGE = (1.0, 10.0)  # [low, high) of X1 and X2 in training; outside it is "extrapolated"
ATOL = 1e-4  # end-to-end parity with the eager model, raw units


# --- fixtures ----------------------------------------------------------------------------------

@dataclass
class Store:
    home: Path
    root: Path
    tags: dict[str, str]  # task -> tag registered by `python -m export`; "mnist", "loud": the newest entries
    eager: dict[str, torch.nn.Module]
    classes: list[str]


# Entries registered by hand, after the exports, so they are the newest of their names.
BROKEN_MNIST = """
import json, sys, bentoml
contract = {**json.load(open(sys.argv[1] + "/contract.json")), "task": "mnist"}
with bentoml.models.create("mnist", labels={"task": "mnist", "kind": "classification"}, metadata={}) as m:
    open(m.path_of("model.onnx"), "wb").write(b"not an ONNX graph")
    open(m.path_of("contract.json"), "w").write(json.dumps(contract))
print(m.tag)
"""
LOUD_PRODUCT = """
import shutil, sys, bentoml, numpy as np, onnx
from onnx import numpy_helper
graph = onnx.load(sys.argv[1] + "/model.onnx")
for init in graph.graph.initializer:
    w = numpy_helper.to_array(init)
    if w.ndim == 2:  # the three weight matrices; biases and normalization statistics are vectors
        init.CopyFrom(numpy_helper.from_array(w * np.float32(1e4), init.name))
with bentoml.models.create("product", labels={"task": "product", "kind": "regression"}, metadata={}) as m:
    onnx.save(graph, m.path_of("model.onnx"))
    shutil.copy(sys.argv[1] + "/contract.json", m.path_of("contract.json"))
print(m.tag)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Tiny product and fashion-mnist models exported by `python -m export` (`serving.exported`), in this
    module's copy of the store, and the newer loud product and broken mnist entries."""
    base = exported(tmp_path_factory)
    root = tmp_path_factory.mktemp("serve")
    home = copy_store(base, root / "bentoml")
    tags = dict(base.tags)
    for name, code, source in (("mnist", BROKEN_MNIST, "fashion-mnist"), ("loud", LOUD_PRODUCT, "product")):
        made = python(code, home, str(entry_folder(home, tags[source])))
        assert made.returncode == 0, made.stderr
        tags[name] = made.stdout.strip().splitlines()[-1]
    ckpts = {task: load_checkpoint(base.root / task / "best.pt") for task in ("product", "fashion-mnist")}
    tasks = t2d.builtin_tasks()
    return Store(home, root, tags, {task: predictor_from_checkpoint(c, tasks[task]) for task, c in ckpts.items()},
                 list(ckpts["fashion-mnist"]["classes"]))


def pins(store: Store) -> dict[str, str]:
    # Every name in the store is served over /v2, so the broken mnist entry, the only one of its name,
    # would keep the server unready: left out ("-mnist"), as an operator would leave out a name they don't serve.
    return {"T2D_PRODUCT_MODEL": store.tags["product"], "T2D_CLASSIFIER_MODEL": store.tags["fashion-mnist"],
            "T2D_MODELS": "-mnist"}


@pytest.fixture(scope="module")
def server(store):
    """The good models, pinned."""
    srv = Server(store.home, store.root / "serve.log", **pins(store))
    yield srv.wait_ready()
    srv.stop()


@pytest.fixture(scope="module")
def newest(store):
    """No pins: the newest of each name, the loud product and the broken mnist. Never ready (the mnist
    is broken), so waited for on /livez."""
    srv = Server(store.home, store.root / "serve-newest.log")
    yield srv.wait_ready(path="/livez")
    srv.stop()


def eager_product(store: Store, x) -> np.ndarray:
    with torch.no_grad():
        return store.eager["product"](torch.tensor(x, dtype=torch.float32)).numpy()[:, 0]


def eager_probabilities(store: Store, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) pixels 0..255, as /classify takes them -> (N, 10): the checkpoint's Predictor takes pixels in
    [0, 1], the units it trained on."""
    with torch.no_grad():
        pixels = torch.tensor(images, dtype=torch.float32)[:, None] / 255
        logits = store.eager["fashion-mnist"](pixels).double().numpy()
    return softmax(logits)


def extrapolated(row) -> bool:
    return not all(TRAIN_RANGE[0] <= v < TRAIN_RANGE[1] for v in row)


# --- answers match the eager model -------------------------------------------------------------

def test_server_logs_the_models_it_serves(server, store):
    log = server.log()
    assert f"product endpoints serve {store.tags['product']}" in log  # pinned: not the newer loud product
    assert f"classifier endpoints serve {store.tags['fashion-mnist']}" in log  # pinned: not the newer mnist


PAIRS = [(3.0, 4.0), (1.0, 1.0), (9.99, 9.99), (5.5, 2.25), (1.0, 10.0), (0.5, 3.0), (12.0, 2.0), (-2.0, 4.0)]


def test_predict_matches_eager(server, store):
    expected = eager_product(store, PAIRS)
    for (x1, x2), want in zip(PAIRS, expected, strict=True):
        got = server.expect(server.post("/predict", {"x1": x1, "x2": x2}), 200)
        assert set(got) == {"y", "model", "extrapolated"}
        assert abs(got["y"] - want) <= ATOL, (x1, x2, got["y"], want)
        assert got["extrapolated"] is extrapolated((x1, x2)), (x1, x2)
        assert got["model"] == store.tags["product"]


@pytest.mark.parametrize("rows", [1, 7, MAX_ROWS])
def test_predict_batch_matches_eager(server, store, rows):
    x = np.random.default_rng(rows).uniform(0, 11, size=(rows, 2)).round(3)  # some rows outside [1, 10)
    got = server.expect(server.post("/predict_batch", {"x": x.tolist()}), 200)
    assert len(got["y"]) == len(got["extrapolated"]) == rows
    np.testing.assert_allclose(got["y"], eager_product(store, x), rtol=0, atol=ATOL)
    assert got["extrapolated"] == [extrapolated(r) for r in x]
    assert got["model"] == store.tags["product"]


def test_classify_matches_eager(server, store):
    images, _ = class_images(10, seed=3)
    floats = np.random.default_rng(0).uniform(0, 255, size=(2, 28, 28))  # pixels need not be integers
    both = np.concatenate([images, floats])
    for image, want in zip(both, eager_probabilities(store, both), strict=True):
        got = server.expect(server.post("/classify", {"image": image.tolist()}), 200)
        assert set(got) == {"label", "class_name", "probabilities", "model"}
        np.testing.assert_allclose(got["probabilities"], want, rtol=0, atol=ATOL)
        assert got["label"] == int(want.argmax()) and got["class_name"] == store.classes[got["label"]]
        assert got["model"] == store.tags["fashion-mnist"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_classify_png_matches_eager(server, store, mode):
    images, _ = class_images(4, seed=4)
    for image, want in zip(images, eager_probabilities(store, images), strict=True):
        got = server.expect(server.post("/classify_png", png(image, mode), "image/png"), 200)
        np.testing.assert_allclose(got["probabilities"], want, rtol=0, atol=ATOL)
        assert got["label"] == int(want.argmax()) and got["model"] == store.tags["fashion-mnist"]


# --- bad requests: 4xx JSON, and the server keeps serving --------------------------------------

_noise = np.random.default_rng(1).integers(0, 256, size=(28, 28))
BAD = {
    # name: (path, body, Content-Type, status, text the error (and its detail) must contain)
    "number as string": ("/predict", {"x1": "3", "x2": 4}, "application/json", 400, "valid number"),
    "bool": ("/predict", {"x1": True, "x2": 4}, "application/json", 400, "valid number"),
    "null": ("/predict", {"x1": None, "x2": 4}, "application/json", 400, "valid number"),
    "missing field": ("/predict", {"x1": 3}, "application/json", 400, "Field required"),
    "extra field": ("/predict", {"x1": 3, "x2": 4, "x3": 5}, "application/json", 400, "Extra inputs"),
    "NaN literal": ("/predict", '{"x1": NaN, "x2": 4}', "application/json", 400, "finite number"),
    "Infinity literal": ("/predict", '{"x1": 3, "x2": -Infinity}', "application/json", 400, "finite number"),
    "overflows float64": ("/predict", '{"x1": 1e400, "x2": 4}', "application/json", 400, "finite number"),
    "overflows float32": ("/predict", '{"x1": 1e39, "x2": 4}', "application/json", 400, "does not fit in float32"),
    "empty body": ("/predict", b"", "application/json", 400, "Field required"),
    "malformed JSON": ("/predict", '{"x1": 3,', "application/json", 400, "Invalid JSON"),
    "JSON array": ("/predict", [3, 4], "application/json", 400, "should be an object"),
    "text/plain": ("/predict", {"x1": 3, "x2": 4}, "text/plain", 415, "Content-Type must be application/json"),
    "form-encoded (curl -d default)": ("/predict", "x1=3&x2=4", "application/x-www-form-urlencoded", 415,
                                       "Content-Type must be application/json"),
    "4-element row": ("/predict_batch", {"x": [[1, 2, 3, 4]]}, "application/json", 400, "at most 2 items"),
    "flat row": ("/predict_batch", {"x": [1, 2]}, "application/json", 400, "valid array"),
    "1-element row": ("/predict_batch", {"x": [[1]]}, "application/json", 400, "Field required"),
    "nested too deep": ("/predict_batch", {"x": [[[1, 2]]]}, "application/json", 400, "valid number"),
    "no rows": ("/predict_batch", {"x": []}, "application/json", 400, "at least 1 item"),
    "too many rows": ("/predict_batch", {"x": [[1, 2]] * (MAX_ROWS + 1)}, "application/json", 400,
                      f"at most {MAX_ROWS} items"),
    "NaN in a row": ("/predict_batch", '{"x": [[1, 2], [NaN, 2]]}', "application/json", 400, "finite number"),
    "27 rows": ("/classify", {"image": [[0] * 28] * 27}, "application/json", 400, "at least 28 items"),
    "row of 29": ("/classify", {"image": [[0] * 28] * 27 + [[0] * 29]}, "application/json", 400, "at most 28 items"),
    "flat image": ("/classify", {"image": [0] * 784}, "application/json", 400, "at most 28 items"),
    "pixel 256": ("/classify", image_with(256), "application/json", 400, "less than or equal to 255"),
    "pixel -1": ("/classify", image_with(-1), "application/json", 400, "greater than or equal to 0"),
    "pixel string": ("/classify", image_with("7"), "application/json", 400, "valid number"),
    "pixel NaN": ("/classify", json.dumps(image_with(0)).replace("0", "NaN", 1), "application/json", 400,
                  "finite number"),
    "image extra field": ("/classify", {**image_with(0), "label": 3}, "application/json", 400, "Extra inputs"),
    "not a PNG": ("/classify_png", b'{"image": []}', "image/png", 400, "not a PNG"),
    "URL instead of PNG": ("/classify_png", b"http://127.0.0.1:9/x.png", "image/png", 400, "not a PNG"),
    "PNG 29x28": ("/classify_png", png(np.zeros((28, 29))), "image/png", 422, "29x28"),
    "PNG 16-bit": ("/classify_png", png(_noise, "I;16"), "image/png", 422, "mode I;16"),
    "PNG truncated": ("/classify_png", png(_noise)[:300], "image/png", 400, "cannot be decoded"),
    "PNG sent as JSON": ("/classify_png", png(_noise), "application/json", 415, "Content-Type must be image/png"),
    "JSON sent as PNG": ("/classify", {"image": [[0] * 28] * 28}, "image/png", 415,
                         "Content-Type must be application/json"),
    "multipart PNG": ("/classify_png", b"--x\r\n\r\n--x--\r\n", "multipart/form-data; boundary=x", 415,
                      "Content-Type must be image/png"),
    "over the size limit": ("/predict_batch", b"[" + b" " * MAX_BODY_BYTES + b"]", "application/json", 413,
                            f"the limit is {MAX_BODY_BYTES} bytes"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_request_is_a_4xx_json_error(server, name):
    path, body, content_type, status, text = BAD[name]
    got = server.expect(server.post(path, body, content_type), status)
    assert isinstance(got.get("error"), str) and got["error"]
    assert text in json.dumps(got), got
    server.expect(server.post("/predict", {"x1": 3, "x2": 4}), 200)  # still serving


def test_body_over_the_limit_without_content_length(server):
    # An iterable body goes out chunked: no Content-Length to check up front, so the guard counts bytes.
    chunks = (b" " * 65536 for _ in range(MAX_BODY_BYTES // 65536 + 1))
    got = server.expect(server.request("POST", "/predict_batch", chunks, {"Content-Type": "application/json"}), 413)
    assert "over" in got["error"]
    server.expect(server.post("/predict", {"x1": 3, "x2": 4}), 200)


def test_json_content_type_may_be_omitted_or_carry_a_charset(server):
    for content_type in (None, "application/json; charset=utf-8", "Application/JSON"):
        assert server.expect(server.post("/predict", {"x1": 3, "x2": 4}, content_type), 200)["model"]


class _Tripwire:
    """Unpickling this creates a file: proof that the server unpickled a request body."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_pickle_body_is_refused_never_unpickled(server, store):
    marker = store.root / "unpickled"
    body = pickle.dumps(_Tripwire(marker))
    for path in ("/predict", "/classify", "/classify_png"):
        got = server.expect(server.post(path, body, "application/vnd.bentoml+pickle"), 415)
        assert "Content-Type must be" in got["error"]
    assert not marker.exists()


def test_thirty_two_concurrent_clients_get_no_503(server):
    def client(i: int) -> list[int]:
        return [server.post("/predict", {"x1": 1 + i % 9, "x2": 2.5}).status for _ in range(5)]

    with ThreadPoolExecutor(32) as pool:
        statuses = [s for batch in pool.map(client, range(32)) for s in batch]
    assert statuses == [200] * 160, {s: statuses.count(s) for s in set(statuses)}


def test_health_and_swagger_ui(server):
    assert server.get("/livez").status == 200 and server.get("/readyz").status == 200
    assert server.get("/").status == 200
    spec = json.loads(server.get("/docs.json").body)
    for path in ("/predict", "/predict_batch", "/classify"):  # an example body, so "Try it out" works as is
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        example = schema["example"]
        server.expect(server.post(path, example), 200)
    assert "image/png" in spec["paths"]["/classify_png"]["post"]["requestBody"]["content"]


# --- without models, with a broken model --------------------------------------------------------

def test_empty_store_answers_503_with_how_to(tmp_path):
    srv = Server(tmp_path / "empty-home", tmp_path / "serve.log")
    try:
        srv.wait_ready()
        for path, body in (("/predict", {"x1": 3, "x2": 4}), ("/predict_batch", {"x": [[3, 4]]})):
            error = srv.expect(srv.post(path, body), 503)["error"]
            assert "python -m train --task product" in error and "python -m export" in error, error
        for path, body, ctype in (("/classify", image_with(0), "application/json"),
                                  ("/classify_png", png(_noise), "image/png")):
            error = srv.expect(srv.post(path, body, ctype), 503)["error"]
            assert "python -m train --task fashion-mnist" in error and "python -m export" in error, error
        assert srv.get("/livez").status == 200 and srv.get("/readyz").status == 200
        srv.expect(srv.post("/predict", {"x1": "3"}), 400)  # bad input is still a 400, model or not
    finally:
        srv.stop()


def test_newest_models_are_served_without_pins(newest, store):
    log = newest.log()
    assert f"product endpoints serve {store.tags['loud']}" in log
    assert "[ERROR]" in log and f"classifier endpoints unavailable: model {store.tags['mnist']}" in log, log
    assert "reason: model.onnx is not an ONNX model" in log  # the log says why; the 503 does not show server paths


def test_broken_model_takes_down_only_its_endpoints(newest, store):
    error = newest.expect(newest.post("/classify", image_with(0)), 503)["error"]
    assert f"model {store.tags['mnist']} in the model store cannot be served" in error, error
    assert "python -m export" in error and str(store.home) not in error
    assert newest.expect(newest.post("/predict", {"x1": 3, "x2": 4}), 200)["model"] == store.tags["loud"]
    # Alive, and not ready: a rolling deployment would keep the servers it was replacing.
    assert newest.get("/livez").status == 200 and newest.get("/readyz").status == 503


def test_non_finite_output_is_an_error_not_null(newest, store):
    # The loud model's gain is about 1e12: 3 * 4 gives a large finite number, 1e30 overflows float32.
    got = newest.expect(newest.post("/predict", {"x1": 3, "x2": 4}), 200)
    assert np.isfinite(got["y"]) and abs(got["y"]) > 1e6
    assert "not finite" in newest.expect(newest.post("/predict", {"x1": 1e30, "x2": 1e30}), 422)["error"]
    error = newest.expect(newest.post("/predict_batch", {"x": [[3, 4], [1e30, 1e30], [5, 5]]}), 422)["error"]
    assert "not finite for row(s) [1]" in error, error
    newest.expect(newest.post("/predict", {"x1": 3, "x2": 4}), 200)


def test_wrong_pin_is_a_503_that_names_it(store):
    code = ("from serve.store import SLOTS, load_slot\n"
            "for slot in SLOTS.values(): print(slot.name, load_slot(slot)[1])")
    got = python(code, store.home, T2D_PRODUCT_MODEL="product:nosuchversion",
                 T2D_CLASSIFIER_MODEL=store.tags["product"])
    assert got.returncode == 0, got.stderr
    assert "T2D_PRODUCT_MODEL=product:nosuchversion is not in the model store" in got.stdout
    assert f"T2D_CLASSIFIER_MODEL={store.tags['product']} names a 'product' model" in got.stdout


def test_service_imports_neither_torch_nor_training_code(store):
    code = ("import sys, serve.service\n"
            "from serve.store import SLOTS, load_slot\n"
            "errors = [load_slot(slot)[1] for slot in SLOTS.values()]\n"
            "assert errors == [None, None], errors\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'train', 'models', 'export'}))")
    got = python(code, store.home, fresh=True, **pins(store))
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().splitlines()[-1] == "[]"


# --- the Bento ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_bentoml_build_packs_the_served_models_and_serves_them(store):
    # Pinned as the main server, so the build packs the good models, not the newest loud and broken ones.
    built = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=REPO, env=env_for(store.home, **pins(store)),
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    bento = store.home / "bentos" / "train-to-deploy"
    folder = bento / (bento / "latest").read_text().strip()
    info = yaml.safe_load((folder / "bento.yaml").read_text())
    assert {m["tag"] for m in info["services"][0]["models"]} == {store.tags["product"], store.tags["fashion-mnist"]}
    assert (folder / "src" / "serve" / "service.py").is_file()
    # Served without pins, the Bento still serves what it was built with, not the newest entries.
    srv = Server(store.home, store.root / "serve-bento.log", target=("train-to-deploy:latest",))
    try:
        srv.wait_ready()
        assert srv.expect(srv.post("/classify", image_with(0)), 200)["model"] == store.tags["fashion-mnist"]
        assert srv.expect(srv.post("/predict", {"x1": 3, "x2": 4}), 200)["model"] == store.tags["product"]
        # Over /v2 too: the packed names at their packed versions, and nothing else in the store.
        for task in ("product", "fashion-mnist"):
            assert srv.expect(srv.get(f"/v2/models/{task}"), 200)["versions"] == [store.tags[task].split(":")[1]]
        assert srv.get("/v2/models/mnist").status == 404
        # The Swagger UI is this project's page, every file it names served here (tests/test_ui.py opens it).
        page = srv.get("/")
        assert page.status == 200 and b"googletagmanager" not in page.body
        files = re.findall(r'(?:src|href)="\./([^"]+)"', page.body.decode())
        assert "static_content/swagger-ui-bundle.js" in files and "docs.js" in files, files
        assert [srv.get("/" + f).status for f in files] == [200] * len(files), files
    finally:
        srv.stop()
