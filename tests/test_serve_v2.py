"""The Open Inference Protocol (KServe v2) routes, end to end: real `bentoml serve` processes, real
onnxruntime, models that `python -m export` registered (`serving.exported`), no mocks.

This module's copy of the store adds, beside the exported product and fashion-mnist (contract version 2,
as `python -m export` writes it):
- `mydata`, twice (an older and a newer version): the product graph with its input and output renamed
  (`features`, `target`) and a contract_version 2 contract with a range [0, 100], so nothing the v2
  path does can rest on the built-in names or on a built-in task;
- `loud`: the product graph with its weights scaled up 1e4-fold per layer (outputs overflow float32);
- `brittle`: the product graph whose output goes through a (-1, 2) reshape and back, so onnxruntime fails
  on an odd number of rows, which pass validation;
- `bad-name` and `bad-shape`: the product graph under contracts that disagree with it (input name x ->
  "features"; shape [batch, 2] -> [batch, 3]).
The main server pins product and the older mydata and leaves the two bad names out; a second server
leaves nothing out and must refuse exactly the two bad ones; a third has tiny traffic limits. One test
starts its own server over a further copy whose `product` is the brittle graph, for the typed endpoints.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import class_images
from serving import Server, copy_store, entry_folder, exported, python, softmax, traffic

from serve.limits import MAX_BODY_BYTES, MAX_ROWS

# Nearly every test here talks to a `bentoml serve` process, and the module first trains and exports the
# store it serves: the fast tier (-m "not slow") leaves the module out.
pytestmark = pytest.mark.slow

JSON = "application/json"

DEFINITIONS = r'''
import json, shutil, sys, bentoml, numpy as np, onnx
from onnx import numpy_helper
product = sys.argv[1]


def create(name, edit_contract=None, edit_graph=None):
    contract = {**json.load(open(product + "/contract.json")), "task": name}
    if edit_contract:
        edit_contract(contract)
    with bentoml.models.create(name, labels={"task": name, "kind": "regression"}, metadata={}) as m:
        graph = onnx.load(product + "/model.onnx")
        if edit_graph:
            edit_graph(graph)
        onnx.save(graph, m.path_of("model.onnx"))
        json.dump(contract, open(m.path_of("contract.json"), "w"))
    return str(m.tag)


def version_2(c):  # what the exporter writes from now on, with other names
    c.update(contract_version=2, variant="fp32")
    c.pop("pixel_scale", None)  # contracts before version 2
    c.pop("target", None)  # version 3's: version 2 scores the first output
    c["inputs"][0].update(name="features", range=[0, 100])
    c["outputs"][0]["name"] = "target"


def rename(graph):
    for old, new in (("x", "features"), ("y", "target")):
        for v in [*graph.graph.input, *graph.graph.output]:
            v.name = new if v.name == old else v.name
        for node in graph.graph.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]


def loud(graph):
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(w * np.float32(1e4), init.name))


def brittle(graph):  # y goes through a (-1, 2) reshape and back: one row, valid input, fails in onnxruntime
    from onnx import helper
    out = graph.graph.output[0].name
    for node in graph.graph.node:
        node.output[:] = [out + "_raw" if n == out else n for n in node.output]
    graph.graph.initializer.extend([numpy_helper.from_array(np.array([-1, 2], np.int64), "pairs"),
                                    numpy_helper.from_array(np.array([-1, 1], np.int64), "column")])
    graph.graph.node.extend([helper.make_node("Reshape", [out + "_raw", "pairs"], [out + "_pairs"]),
                             helper.make_node("Reshape", [out + "_pairs", "column"], [out])])
'''

ENTRIES = DEFINITIONS + '''
tags = {"mydata_old": create("mydata", version_2, rename), "mydata_new": create("mydata", version_2, rename),
        "loud": create("loud", None, loud), "brittle": create("brittle", None, brittle),
        "bad-name": create("bad-name", lambda c: c["inputs"][0].update(name="features")),
        "bad-shape": create("bad-shape", lambda c: (c["inputs"][0].update(shape=["batch", 3]),
                                                     c["train_range"].append([1.0, 10.0])))}
print(json.dumps(tags))
'''


@dataclass
class Store:
    home: Path
    root: Path
    tags: dict[str, str]

    def session(self, key: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(entry_folder(self.home, self.tags[key]) / "model.onnx"),
                                    providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    base = exported(tmp_path_factory)
    root = tmp_path_factory.mktemp("v2")
    home = copy_store(base, root / "bentoml")
    made = python(ENTRIES, home, str(entry_folder(home, base.tags["product"])))
    assert made.returncode == 0, made.stderr
    return Store(home, root, {**base.tags, **json.loads(made.stdout.strip().splitlines()[-1])})


def version(tag: str) -> str:
    return tag.split(":")[1]


@pytest.fixture(scope="module")
def server(store):
    srv = Server(store.home, store.root / "serve.log", T2D_PRODUCT_MODEL=store.tags["product"],
                 T2D_MODELS=f"{store.tags['mydata_old']},-bad-name,-bad-shape")
    yield srv.wait_ready()
    srv.stop()


def infer(srv: Server, model: str, x, name: str = "x", **extra):
    x = np.asarray(x)
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}
    return srv.post(f"/v2/models/{model}/infer", body)


# --- metadata, health, readiness --------------------------------------------------------------------

def test_server_metadata_and_health(server):
    meta = server.expect(server.get("/v2"), 200)
    assert meta["name"] == "train-to-deploy" and meta["extensions"] == ["binary_tensor_data"] and meta["version"]
    assert server.expect(server.get("/v2/health/live"), 200) == {"live": True}
    assert server.expect(server.get("/v2/health/ready"), 200) == {"ready": True}
    assert server.get("/readyz").status == 200


def test_model_metadata_comes_from_the_contract(server, store):
    expected = {
        "product": ("product", "x", [-1, 2], "y", [-1, 1]),
        "fashion-mnist": ("fashion-mnist", "image", [-1, 1, 28, 28], "logits", [-1, 10]),
        "mydata_old": ("mydata", "features", [-1, 2], "target", [-1, 1]),
    }
    for key, (name, inp, in_shape, out, out_shape) in expected.items():
        tag = store.tags[key]
        want = {"name": name, "versions": [version(tag)], "platform": "onnxruntime_onnx",
                "inputs": [{"name": inp, "datatype": "FP32", "shape": in_shape}],
                "outputs": [{"name": out, "datatype": "FP32", "shape": out_shape}],
                "parameters": {"variant": "fp32"}}
        if name == "fashion-mnist":  # an image input with a range: it also takes PNG and JPEG files
            want["inputs"][0]["parameters"] = {"encoded_image": "png,jpeg", "image_mode": "L", "image_size": "28x28",
                                               "image_resize": "bilinear", "image_range": "0,1"}
        assert server.expect(server.get(f"/v2/models/{name}"), 200) == want
        assert server.expect(server.get(f"/v2/models/{name}/versions/{version(tag)}"), 200) == want
        for path in (f"/v2/models/{name}/ready", f"/v2/models/{name}/versions/{version(tag)}/ready"):
            assert server.expect(server.get(path), 200) == {"name": name, "ready": True}


def test_unknown_model_or_version_is_404(server, store):
    for path in ("/v2/models/nosuch", "/v2/models/nosuch/ready", "/v2/models/product/versions/nosuch",
                 "/v2/models/product/versions/nosuch/ready"):
        assert "error" in server.expect(server.get(path), 404)
    # In the store, not served: say which one is and how to pin this one.
    error = server.expect(server.get(f"/v2/models/mydata/versions/{version(store.tags['mydata_new'])}"), 404)["error"]
    assert f"serves {store.tags['mydata_old']}" in error and f"T2D_MODELS={store.tags['mydata_new']}" in error, error
    error = server.expect(infer(server, f"mydata/versions/{version(store.tags['mydata_new'])}", [[3, 4]], "features"),
                          404)["error"]
    assert "not served" in error
    # Left out by T2D_MODELS: not served at all.
    assert server.get("/v2/models/bad-name").status == 404
    assert "no route" in server.expect(server.get("/v2/models/product/nosuch"), 404)["error"]


# --- answers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 256])
def test_product_infer_equals_the_typed_endpoint_and_the_onnx_model(server, store, rows):
    x = np.random.default_rng(rows).uniform(0, 11, size=(rows, 2)).astype(np.float32)
    got = server.expect(infer(server, "product", x, id="req-7"), 200)
    assert got["model_name"] == "product" and got["model_version"] == version(store.tags["product"])
    assert got["id"] == "req-7"
    (out,) = got["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [rows, 1]
    typed = server.expect(server.post("/predict_batch", {"x": x.tolist()}), 200)
    assert out["data"] == typed["y"]  # the same session on the same float32 batch: identical
    (direct,) = store.session("product").run(None, {"x": x})
    np.testing.assert_allclose(out["data"], direct[:, 0], rtol=0, atol=1e-6)
    if rows == 1:
        single = server.expect(server.post("/predict", {"x1": float(x[0, 0]), "x2": float(x[0, 1])}), 200)
        assert out["data"] == [single["y"]]


def test_a_new_name_is_discovered_and_served_with_its_own_names(server, store):
    x = np.array([[3, 4], [50.5, 0], [100, 100]], dtype=np.float32)
    got = server.expect(infer(server, "mydata", x, "features", outputs=[{"name": "target"}]), 200)
    assert got["model_version"] == version(store.tags["mydata_old"])  # pinned by T2D_MODELS, not the newest
    (out,) = got["outputs"]
    (direct,) = store.session("mydata_old").run(None, {"features": x})
    assert out["name"] == "target" and out["shape"] == [3, 1]
    np.testing.assert_allclose(out["data"], direct[:, 0], rtol=0, atol=1e-6)
    assert f"/v2/models/mydata serves {store.tags['mydata_old']}" in server.log()


def test_classifier_infer_gives_the_logits_of_the_typed_endpoints_probabilities(server, store):
    images, _ = class_images(3, seed=5)
    for image in images:
        pixels = image.astype(np.float32) / np.float32(255)
        nested = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                              "data": pixels.reshape(1, 1, 28, 28).tolist()}]}  # nested lists, as the protocol allows
        flat = server.expect(infer(server, "fashion-mnist", pixels.reshape(1, 1, 28, 28), "image"), 200)
        got = server.expect(server.post("/v2/models/fashion-mnist/infer", nested), 200)
        assert got["outputs"] == flat["outputs"]
        (out,) = got["outputs"]
        assert out["name"] == "logits" and out["shape"] == [1, 10]
        typed = server.expect(server.post("/classify", {"image": image.tolist()}), 200)
        np.testing.assert_allclose(softmax(np.array(out["data"], dtype=np.float64)), typed["probabilities"],
                                   rtol=0, atol=1e-6)
        (direct,) = store.session("fashion-mnist").run(None, {"image": pixels.reshape(1, 1, 28, 28)})
        np.testing.assert_allclose(out["data"], direct[0], rtol=0, atol=1e-5)


# --- Triton's binary tensor data extension ----------------------------------------------------------------------

def triton(server):
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")


@pytest.mark.parametrize("model,name,rows", [("product", "x", 5), ("fashion-mnist", "image", 600)])
def test_tritonclient_with_its_defaults_gets_onnxruntime_s_answers(server, store, model, name, rows):
    """tritonclient's defaults send the inputs as binary data and ask for every output as binary data. 600 images
    are 1.9 MB of binary data, more than the 1 MiB a JSON body may be."""
    httpclient, client = triton(server)
    rng = np.random.default_rng(rows)
    x = (rng.uniform(1, 10, (rows, 2)) if model == "product" else rng.random((rows, 1, 28, 28))).astype(np.float32)
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True: the default
    result = client.infer(model, [inp])  # no outputs named: all of them, as binary data
    answer = result.get_response()
    assert answer["parameters"] == {"variant": "fp32"}
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in answer["outputs"])
    (direct,) = store.session(model).run(None, {name: x})
    out_name = answer["outputs"][0]["name"]
    np.testing.assert_array_equal(result.as_numpy(out_name), direct)
    client.close()


def test_binary_and_json_inputs_and_outputs_mix(server, store):
    """One output as binary data, asked by name, while the input is JSON; and the other way round."""
    httpclient, client = triton(server)
    x = np.array([[3, 4], [2, 5]], dtype=np.float32)
    (direct,) = store.session("product").run(None, {"x": x})
    for binary_in, binary_out in ((False, True), (True, False)):
        inp = httpclient.InferInput("x", [2, 2], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary_in)
        result = client.infer("product", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary_out)])
        (out,) = result.get_response()["outputs"]
        assert ("data" in out) != binary_out
        np.testing.assert_array_equal(result.as_numpy("y"), direct)
    client.close()


def binary_request(server, header: dict, data: bytes, header_length: int | None = None):
    head = json.dumps(header).encode()
    return server.request("POST", "/v2/models/product/infer", head + data,
                          {"Inference-Header-Content-Length": str(len(head) if header_length is None
                                                                  else header_length)})


BINARY_BAD = {
    "fewer bytes than the size says": ({"binary_data_size": 16}, np.ones(3, "<f4").tobytes(), None,
                                       "only 12 bytes of binary data are left"),
    "size disagrees with the shape": ({"binary_data_size": 12}, np.ones(3, "<f4").tobytes(), None,
                                      "has 12 bytes of binary data; shape [2, 2] of FP32 needs 16"),
    "bytes left over": ({"binary_data_size": 16}, np.ones(5, "<f4").tobytes(), None,
                        "4 bytes of binary data that no input's binary_data_size accounts for"),
    "header longer than the body": ({"binary_data_size": 16}, np.ones(4, "<f4").tobytes(), 10 ** 6,
                                    "Inference-Header-Content-Length is '1000000'"),
    "NaN in binary data": ({"binary_data_size": 16}, np.array([1, np.nan, 2, 3], "<f4").tobytes(), None,
                           "beyond float32"),
    "negative size": ({"binary_data_size": -1}, b"", None, "binary_data_size must be a byte count"),
}


@pytest.mark.parametrize("name", BINARY_BAD)
def test_malformed_binary_requests_are_400(server, name):
    parameters, data, header_length, message = BINARY_BAD[name]
    header = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": parameters}]}
    reply = binary_request(server, header, data, header_length)
    assert reply.status == 400 and message in reply.json["error"], (reply.status, reply.body)
    assert server.expect(infer(server, "product", [[3, 4]]), 200)


def test_binary_bodies_are_limited_by_what_the_model_can_take(server):
    """A binary request may be larger than a JSON one (1 MiB), up to the model's largest valid request: the product
    model takes 4096 rows of 2 floats (32 KiB) plus a header, so 1 MiB of binary data is refused before it is read."""
    data = np.ones(2 * 131072, "<f4").tobytes()  # 1 MiB
    header = {"inputs": [{"name": "x", "shape": [131072, 2], "datatype": "FP32",
                          "parameters": {"binary_data_size": len(data)}}]}
    reply = binary_request(server, header, data)
    assert reply.status == 413 and "the limit for this model's binary requests is" in reply.json["error"], reply.body
    assert server.expect(infer(server, "product", [[3, 4]]), 200)


def test_non_finite_output_is_422_and_the_server_keeps_serving(server):
    assert np.isfinite(server.expect(infer(server, "loud", [[3, 4]]), 200)["outputs"][0]["data"]).all()
    error = server.expect(infer(server, "loud", [[3, 4], [1e30, 1e30]]), 422)["error"]
    assert "not finite for row(s) [1]" in error, error
    server.expect(infer(server, "product", [[3, 4]]), 200)


def test_typed_endpoints_answer_the_same_json_500_when_onnxruntime_fails(store, tmp_path):
    """/predict and /predict_batch over a `product` that fails in onnxruntime on odd row counts (the
    brittle graph): a JSON 500 that names the model, and the server keeps serving."""
    home = copy_store(store, tmp_path / "bentoml")
    made = python(DEFINITIONS + 'print(create("product", None, brittle))', home,
                  str(entry_folder(home, store.tags["product"])))
    assert made.returncode == 0, made.stderr
    tag = made.stdout.strip().splitlines()[-1]
    srv = Server(home, tmp_path / "serve.log", T2D_PRODUCT_MODEL=tag, T2D_MODELS="-bad-name,-bad-shape").wait_ready()
    try:
        error = srv.expect(srv.post("/predict", {"x1": 3, "x2": 4}), 500)["error"]
        assert error.startswith(f"model {tag} failed on this input (x [1, 2])") and "Reshape" in error, error
        assert "Traceback" not in error and "onnxruntime_src" not in error, error
        assert len(srv.expect(srv.post("/predict_batch", {"x": [[3, 4], [5, 6]]}), 200)["y"]) == 2
        assert "failed on this input (x [3, 2])" in srv.expect(
            srv.post("/predict_batch", {"x": [[3, 4], [5, 6], [7, 8]]}), 500)["error"]
        assert srv.expect(srv.post("/classify", {"image": [[0] * 28] * 28}), 200)["model"]  # the other slot
        assert f"model {tag} failed" in srv.log()  # logged where it happened
    finally:
        srv.stop()


def test_onnxruntime_failing_on_valid_input_is_a_json_500_and_the_server_keeps_serving(server):
    assert len(server.expect(infer(server, "brittle", [[3, 4], [5, 6]]), 200)["outputs"][0]["data"]) == 2
    error = server.expect(infer(server, "brittle", [[3, 4]]), 500)["error"]
    assert error.startswith("model brittle:") and "failed on this input (x [1, 2])" in error, error
    assert "Reshape" in error and "Traceback" not in error and "onnxruntime_src" not in error, error
    server.expect(infer(server, "brittle", [[3, 4], [5, 6]]), 200)
    server.expect(infer(server, "product", [[3, 4]]), 200)


# --- bad requests: 4xx JSON, and the server keeps serving -------------------------------------------

def body(**entry) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [3, 4], **entry}]}


def raw(**entry) -> str:
    return json.dumps(body(**entry))


IMAGE = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
P = "/v2/models/product/infer"
BAD = {
    # name: (path, body, Content-Type, status, text the error must contain)
    "wrong input name": (P, body(name="z"), JSON, 400, 'inputs[0].name is "z"; this model takes x (FP32 [n, 2])'),
    "input name not a string": (P, body(name=["x"]), JSON, 400, 'inputs[0].name is ["x"]'),
    "output name not a string": (P, {**body(), "outputs": [{"name": {"y": 1}}]}, JSON, 400,
                                 'outputs[0].name is {"y": 1}'),
    "no inputs key": (P, {"id": "a"}, JSON, 400, "inputs must be a non-empty list"),
    "empty inputs": (P, {"inputs": []}, JSON, 400, "inputs must be a non-empty list"),
    "input without data": (P, {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32"}]}, JSON, 400,
                           "inputs[0] lacks data"),
    "extra input": (P, {"inputs": [body()["inputs"][0], {**body()["inputs"][0], "name": "x2"}]}, JSON, 400,
                    'inputs[1].name is "x2"'),
    "input twice": (P, {"inputs": body()["inputs"] * 2}, JSON, 400, "input 'x' is given twice"),
    "unknown input key": (P, body(dtype="float32"), JSON, 400, "inputs[0] has unknown key(s) ['dtype']"),
    "FP64": (P, body(datatype="FP64"), JSON, 400, 'datatype is "FP64"; send FP32'),
    "INT64": (P, body(datatype="INT64"), JSON, 400, "send FP32"),
    "lower-case datatype": (P, body(datatype="fp32"), JSON, 400, "send FP32"),
    "shape of a row": (P, body(shape=[2]), JSON, 400, "send [n, 2] with 1 <= n <= 4096"),
    "wrong sample shape": (P, body(shape=[1, 3], data=[1, 2, 3]), JSON, 400, "shape is [1, 3]; send [n, 2]"),
    "zero rows": (P, body(shape=[0, 2], data=[]), JSON, 400, "shape is [0, 2]"),
    "too many rows": (P, body(shape=[MAX_ROWS + 1, 2], data=[1] * (2 * MAX_ROWS + 2)), JSON, 400,
                      f"shape is [{MAX_ROWS + 1}, 2]"),
    "float in shape": (P, body(shape=[1.0, 2]), JSON, 400, "shape is [1.0, 2]"),
    "bool in shape": (P, body(shape=[True, 2]), JSON, 400, "shape is [true, 2]"),
    "count below shape": (P, body(shape=[2, 2], data=[1, 2, 3]), JSON, 400, "data has 3 values; shape [2, 2] needs 4"),
    "count above shape": (P, body(data=[1, 2, 3]), JSON, 400, "data has 3 values; shape [1, 2] needs 2"),
    "nested mixed": (P, body(shape=[2, 2], data=[[1, 2], 3, 4]), JSON, 400, "mixes lists and numbers"),
    "data not a list": (P, body(data="3,4"), JSON, 400, "data must be a list (flat, row-major)"),
    "number as string": (P, body(data=["3", 4]), JSON, 400, 'data holds "3"; send numbers'),
    "bool": (P, body(data=[True, 4]), JSON, 400, "data holds true; send numbers"),
    "null": (P, body(data=[None, 4]), JSON, 400, "data holds null; send numbers"),
    "object": (P, body(data=[{"v": 3}, 4]), JSON, 400, 'data holds {"v": 3}; send numbers'),
    "NaN literal": (P, raw(data=[0, 4]).replace("0", "NaN", 1), JSON, 400, "NaN, which is not a JSON number"),
    "Infinity literal": (P, raw(data=[0, 4]).replace("0", "Infinity", 1), JSON, 400, "Infinity, which is not"),
    "-Infinity literal": (P, raw(data=[0, 4]).replace("0", "-Infinity", 1), JSON, 400, "-Infinity, which is not"),
    "overflows float32": (P, body(data=[1e39, 4]), JSON, 400, "1e+39, beyond float32"),
    "overflows float64": (P, raw(data=[0, 4]).replace("0", "1e400", 1), JSON, 400, "inf, beyond float32"),
    "huge integer": (P, raw(data=[0, 4]).replace("0", "1" + "0" * 400, 1), JSON, 400, "beyond float32"),
    "5000-digit integer": (P, raw(data=[0, 4]).replace("0", "1" * 5000, 1), JSON, 400,
                           "a number json cannot read: Exceeds the limit (4300 digits)"),
    "mydata above its range": ("/v2/models/mydata/infer", body(name="features", data=[3, 100.5]), JSON, 400,
                               "inputs[0] (features).data[1] is 100.5, outside the valid range [0, 100]"),
    "pixels 0..255 where [0, 1] belongs": ("/v2/models/fashion-mnist/infer",
                                           {"inputs": [{**IMAGE, "data": [0.5] * 783 + [255]}]}, JSON, 400,
                                           "data[783] is 255, outside the valid range [0, 1]"),
    "negative pixel": ("/v2/models/fashion-mnist/infer", {"inputs": [{**IMAGE, "data": [-0.1] + [0.5] * 783}]},
                       JSON, 400, "data[0] is -0.1, outside the valid range [0, 1]"),
    "unknown output": (P, {**body(), "outputs": [{"name": "z"}]}, JSON, 400,
                       'outputs[0].name is "z"; this model gives y'),
    "empty outputs": (P, {**body(), "outputs": []}, JSON, 400, "outputs, when given, must be a non-empty list"),
    "output twice": (P, {**body(), "outputs": [{"name": "y"}, {"name": "y"}]}, JSON, 400, "requested twice"),
    "id not a string": (P, {**body(), "id": 7}, JSON, 400, "id must be a string"),
    "binary_data not a boolean": (P, {**body(), "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, JSON,
                                  400, "binary_data must be true or false"),
    "parameters not an object": (P, {**body(), "parameters": [1]}, JSON, 400, "parameters must be an object"),
    "unknown top-level key": (P, {**body(), "input": []}, JSON, 400, "unknown key(s) ['input'] in the body"),
    "key twice": (P, '{"inputs": [], "inputs": ' + json.dumps(body()["inputs"]) + "}", JSON, 400,
                  "names 'inputs' more than once"),
    "malformed JSON": (P, '{"inputs": [', JSON, 400, "the body is not valid JSON"),
    "empty body": (P, b"", JSON, 400, "the body is not valid JSON"),
    "JSON array": (P, [body()], JSON, 400, "the body must be a JSON object"),
    "not UTF-8": (P, b'{"id": "\xff"}', JSON, 400, "not UTF-8"),
    "byte-order mark": (P, b"\xef\xbb\xbf" + raw().encode(), JSON, 400, "not valid JSON"),
    "nested 100,000 deep": (P, "[" * 100_000 + "]" * 100_000, JSON, 400, "nested too deeply"),
    "unknown model": ("/v2/models/nosuch/infer", body(), JSON, 404, "no model named 'nosuch' is served here"),
    "text/plain": (P, body(), "text/plain", 415, f"Content-Type must be application/json for {P}"),
    "versioned, text/plain": ("/v2/models/product/versions/v/infer", body(), "text/plain", 415,
                              "Content-Type must be application/json"),
    "over the size limit": (P, b"[" + b" " * MAX_BODY_BYTES + b"]", JSON, 413, f"the limit is {MAX_BODY_BYTES} bytes"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_request_is_a_4xx_json_error_and_the_server_keeps_serving(server, name):
    path, payload, content_type, status, text = BAD[name]
    got = server.expect(server.post(path, payload, content_type), status)
    assert set(got) == {"error"} and isinstance(got["error"], str) and "\n" not in got["error"], got
    assert text in got["error"], got
    server.expect(infer(server, "product", [[3, 4]]), 200)


ODD_VALUES = [None, True, False, 0, -1, 1.5, 1e300, "x", "", [], [[]], {}, {"a": 1}, [None], ["x"] * 3]


def _replacements(value, path=()):
    """Every (path, odd value) pair: each node of a valid body replaced by each odd value in turn."""
    for odd in ODD_VALUES:
        yield path, odd
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _replacements(child, (*path, key))


def _replaced(value, path, odd):
    if not path:
        return odd
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], odd)
    return copy


def test_any_value_anywhere_in_the_body_is_a_4xx_or_a_200_never_a_5xx(server):
    valid = {"id": "a", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [3, 4],
                                    "parameters": {"p": 1}}], "outputs": [{"name": "y"}], "parameters": {"q": "r"}}
    statuses = {}
    for path, odd in _replacements(valid):
        got = server.post(P, json.dumps(_replaced(valid, path, odd)))
        statuses[got.status] = statuses.get(got.status, 0) + 1
        assert got.status in (200, 400), (path, odd, got.status, got.body[:300])
        if got.status == 400:
            assert set(got.json) == {"error"}, (path, odd, got.body[:300])
    assert statuses[400] > 200 and statuses.get(200, 0) > 5, statuses  # both kinds exercised
    assert "Traceback" not in server.log()


def test_wrong_methods_are_405_json(server):
    for method, path in (("GET", P), ("PUT", P), ("GET", "/v2/models/product/versions/x/infer"),
                         ("POST", "/v2/models/product"), ("POST", "/v2/health/ready")):
        got = server.expect(server.request(method, path, b"{}", {"Content-Type": JSON}), 405)
        assert "error" in got, (method, path)
    server.expect(infer(server, "product", [[3, 4]]), 200)


def test_no_traceback_in_the_log_for_bad_requests(server):
    assert "Traceback" not in server.log()


# --- a contract that disagrees with its graph ---------------------------------------------------------

def test_contract_that_disagrees_with_its_graph_is_refused_and_the_others_served(store):
    srv = Server(store.home, store.root / "serve-refusing.log")
    try:
        srv.wait_ready(path="/livez")
        time.sleep(0.5)
        assert srv.get("/readyz").status == 503
        assert srv.expect(srv.get("/v2/health/ready"), 503)["ready"] is False
        for name in ("bad-name", "bad-shape"):
            assert srv.expect(srv.get(f"/v2/models/{name}/ready"), 503)["error"]
            error = srv.expect(infer(srv, name, [[3, 4]]), 503)["error"]
            assert f"model {store.tags[name]} in the model store cannot be served" in error, error
            assert str(store.home) not in error  # paths stay in the log
        for name in ("product", "fashion-mnist", "mydata", "loud"):
            assert srv.get(f"/v2/models/{name}/ready").status == 200, name
        got = srv.expect(infer(srv, "mydata", [[3, 4]], "features"), 200)
        assert got["model_version"] == version(store.tags["mydata_new"])  # unpinned: the newest
        srv.expect(srv.post("/predict", {"x1": 3, "x2": 4}), 200)
        log = srv.log()
        assert (f"/v2/models/bad-name unavailable: model {store.tags['bad-name']}" in log
                and "reason: contract.json's inputs are ['features'], model.onnx's are ['x']" in log), log[-3000:]
        assert "reason: input 'x' is [batch, 3] in contract.json, ['batch', 2] in model.onnx" in log, log[-3000:]
        assert log.count("[ERROR]") == 2, log[-3000:]
    finally:
        srv.stop()


# --- BentoML's traffic limits cover the mounted app ---------------------------------------------------

def test_max_concurrency_429_and_timeout_504_apply_to_v2(store):
    srv = Server(store.home, store.root / "serve-limited.log", T2D_MODELS="-bad-name,-bad-shape",
                 **traffic(max_concurrency=2, timeout=4))
    try:
        srv.wait_ready()
        payload = raw().encode()
        held = [srv.start_slowly(P, payload) for _ in range(2)]  # in flight until their bodies end
        time.sleep(0.5)
        got = srv.expect(srv.post(P, payload), 429)
        assert got == {"error": "Too many requests"}
        # BentoML exempts /livez and /readyz from the limit, not the v2 health routes.
        assert srv.get("/readyz").status == 200 and srv.get("/v2/health/ready").status == 429
        for request in held:  # their bodies never finish: BentoML's timer answers
            reply = request.reply(timeout=30)
            assert reply.status == 504
            assert "Not able to process the request in 4 seconds" in json.loads(reply.body)["error"]
        srv.expect(srv.post(P, payload), 200)
    finally:
        srv.stop()
