"""serve.store's model loading refuses ONNX files whose tensors keep their data outside the file.

`read_self_contained_onnx` is what `serve.store.load` calls on a store entry's model.onnx, so it is
called directly here, without a model store or a server, on small graphs crafted with onnx.helper.
Every crafted file points at real weights (the right bytes, outside the model's folder, or inside it
through a link), so a loader that followed the `location` would succeed; each must be refused with a
reason that names the location, and the referenced file is never opened (a FIFO would block). The
same refusals through a real model store and `bentoml serve` are in test_serve_reliability.py.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data, uses_external_data

W = np.array([0.5, -2.0], dtype=np.float32)  # y = x + W


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """serve.store, imported with its own BENTOML_HOME (BentoML reads it at import; nothing is written)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml")))
        import serve.store
    return serve.store


def weight(name: str = "w") -> TensorProto:
    return numpy_helper.from_array(W, name)


def graph_with(where: str) -> tuple[onnx.ModelProto, TensorProto]:
    """x + W with W stored `where`: initializer, attribute (a Constant node), sparse initializer, subgraph
    (an If branch's Constant), or function (a local function's Constant). Returns the model and W's proto."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    functions, initializers, sparse, nodes = [], [], [], []
    if where == "initializer":
        initializers.append(weight())
    elif where == "attribute":
        nodes.append(helper.make_node("Constant", [], ["w"], value=weight("w_value")))
    elif where == "sparse initializer":
        sparse.append(helper.make_sparse_tensor(weight(), numpy_helper.from_array(np.array([0, 1]), "w_idx"), [2]))
    elif where == "subgraph":
        w_out = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])
        branch = helper.make_graph([helper.make_node("Constant", [], ["w"], value=weight("w_value"))], "branch", [],
                                   [w_out])
        initializers.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch))
    elif where == "function":
        body = [helper.make_node("Constant", [], ["w"], value=weight("w_value")),
                helper.make_node("Add", ["a", "w"], ["b"])]
        functions.append(helper.make_function("local", "AddW", ["a"], ["b"], body, [helper.make_opsetid("", 17)]))
        nodes.append(helper.make_node("AddW", ["x"], ["y"], domain="local"))
    if where != "function":
        nodes.append(helper.make_node("Add", ["x", "w"], ["y"]))
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers, sparse_initializer=sparse)
    model = helper.make_model(graph, functions=functions,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    return model, _find_w(model)


def _find_w(model: onnx.ModelProto) -> TensorProto:
    graph = model.graph
    candidates = [*graph.initializer, *(s.values for s in graph.sparse_initializer)]
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        for attr in node.attribute:
            candidates += [attr.t] if attr.HasField("t") else []
            if attr.HasField("g"):
                candidates += [a.t for n in attr.g.node for a in n.attribute if a.HasField("t")]
    return next(t for t in candidates if t.name in ("w", "w_value"))


def save(model: onnx.ModelProto, folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def externalize(tensor: TensorProto, location: str) -> None:
    """Point `tensor` at `location` for its bytes, as onnx's external data does, and drop its own copy."""
    set_external_data(tensor, location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")


# --- a self-contained file is served ------------------------------------------------------------

@pytest.mark.parametrize("where", ["initializer", "attribute", "subgraph", "function"])
def test_self_contained_file_is_read_and_runs(store, tmp_path, where):
    model, _ = graph_with(where)
    path = save(model, tmp_path / "entry")
    data = store.read_self_contained_onnx(path)
    assert data == (tmp_path / "entry" / "model.onnx").read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.array([[3.0, 4.0]], np.float32)})
    np.testing.assert_array_equal(y, [[3.5, 2.0]])


# --- external data, wherever it points, is refused ---------------------------------------------

def outside_weights(tmp_path) -> str:
    """W's bytes in a folder beside the model's: what a traversal would read."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    target = tmp_path / "outside" / "w.bin"
    target.write_bytes(W.tobytes())
    return str(target)


def link_to_outside(entry, tmp_path) -> str:
    entry.mkdir(parents=True, exist_ok=True)
    os.symlink(outside_weights(tmp_path), entry / "w.bin")
    return "w.bin"


def dir_link_to_outside(entry, tmp_path) -> str:
    outside_weights(tmp_path)
    entry.mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path / "outside", entry / "linked")  # a parent folder that is a link (CVE-2026-34447's shape)
    return "linked/w.bin"


def hard_link_to_outside(entry, tmp_path) -> str:
    entry.mkdir(parents=True, exist_ok=True)
    os.link(outside_weights(tmp_path), entry / "w.bin")  # looks like a plain file inside (CVE-2026-34446's shape)
    return "w.bin"


def inside(entry, tmp_path) -> str:
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "w.bin").write_bytes(W.tobytes())
    return "w.bin"


def fifo_outside(entry, tmp_path) -> str:
    (tmp_path / "outside").mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "outside" / "fifo")  # opening it for reading would block: this test would time out
    return str(tmp_path / "outside" / "fifo")


LOCATIONS = {  # case -> how to make the location (entry folder, scratch folder) -> location string
    # The entry folder is <tmp>/store/product/v1, as in BentoML's store: three levels up is <tmp>.
    "relative ../": lambda entry, tmp: (outside_weights(tmp), "../../../outside/w.bin")[1],
    "nested sub/../": lambda entry, tmp: (outside_weights(tmp), "sub/../../../../outside/w.bin")[1],
    "absolute path": lambda entry, tmp: outside_weights(tmp),
    "symlink leading out": link_to_outside,
    "symlinked parent folder": dir_link_to_outside,
    "hard link to an outside file": hard_link_to_outside,
    "plain file inside the folder": inside,
    "FIFO, absolute": fifo_outside,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(LOCATIONS))
def test_external_initializer_is_refused_without_opening_it(store, tmp_path, case):
    entry = tmp_path / "store" / "product" / "v1"
    model, w = graph_with("initializer")
    location = LOCATIONS[case](entry, tmp_path)
    externalize(w, location)
    path = save(model, entry)
    # The crafted file does point at W's real bytes: following the location would load the model.
    assert uses_external_data(onnx.load(path, load_external_data=False).graph.initializer[0])
    if not case.startswith("FIFO"):
        resolved = location if os.path.isabs(location) else os.path.join(entry, location)
        assert open(os.path.realpath(resolved), "rb").read() == W.tobytes()
    with pytest.raises(ValueError) as e:
        store.read_self_contained_onnx(path)
    message = str(e.value)
    assert "model.onnx refused: 1 tensor(s) keep their data in external file(s)" in message, message
    assert repr(location) in message and "not read" in message, message


@pytest.mark.parametrize("where", ["attribute", "sparse initializer", "subgraph", "function"])
def test_external_data_anywhere_in_the_model_is_refused(store, tmp_path, where):
    model, w = graph_with(where)
    outside_weights(tmp_path)
    externalize(w, "../outside/w.bin")
    path = save(model, tmp_path / "entry")
    with pytest.raises(ValueError, match=r"refused: 1 tensor\(s\) keep their data .*'\.\./outside/w\.bin'"):
        store.read_self_contained_onnx(path)


def test_external_flag_without_a_location_is_refused(store, tmp_path):
    model, w = graph_with("initializer")
    w.data_location = TensorProto.EXTERNAL  # no location entry at all: onnxruntime would guess
    w.ClearField("raw_data")
    with pytest.raises(ValueError, match=r"refused: 1 tensor\(s\) keep their data in external file\(s\) \[\]"):
        store.read_self_contained_onnx(save(model, tmp_path / "entry"))


def test_model_file_that_is_a_symlink_leading_out_is_refused(store, tmp_path):
    model, _ = graph_with("initializer")
    real = save(model, tmp_path / "outside")
    (tmp_path / "entry").mkdir()
    os.symlink(real, tmp_path / "entry" / "model.onnx")
    with pytest.raises(ValueError, match=r"model.onnx is a symbolic link \(to .*outside/model.onnx\)"):
        store.read_self_contained_onnx(str(tmp_path / "entry" / "model.onnx"))
