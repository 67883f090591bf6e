"""Find the exported model each group of endpoints serves, and open it with onnxruntime.

What `python -m export` registers (one BentoML model per export, named after its task):
`model.onnx` (raw units in and out, normalization inside the graph, dynamic batch axis) and
`contract.json` (input and output names and shapes, class names, training range, pixel scale).

A slot is one group of endpoints: `product` serves /predict and /predict_batch from the newest
model named `product`; `classifier` serves /classify and /classify_png from the newest model named
`fashion-mnist` or `mnist`. "Newest" is by creation time in the store. An environment variable
pins a tag instead (T2D_PRODUCT_MODEL=product:abc, T2D_CLASSIFIER_MODEL=fashion-mnist:xyz). A
built Bento serves the models it was built with (the tags in its bento.yaml), not whatever is
newest in the store where it runs.

A slot that has no model, or whose model fails to load, becomes a one-line reason that its
endpoints answer with 503; the other slot serves regardless. A model that fails to load also keeps
/readyz at 503 (`serve.service`); a slot with nothing registered does not.

Only plain files of the model's own folder are read: a model.onnx or contract.json that is a
symbolic link (or a FIFO, a device...) is refused, and so is a model.onnx with any tensor whose data
lives in an external file. `python -m export` writes self-contained files, so refusing all external
data is the simplest rule that is safe whatever the onnxruntime version: a `location` such as
"../../.ssh/id_rsa" or an absolute path would make a loader read a file outside the model store.
(onnxruntime 1.32 itself refuses locations that leave the model's folder, links included; it loads a
model.onnx that is a link, and data files inside the folder.) The graph is parsed with onnx, without
its external data, so a refused `location` is never opened; onnxruntime then loads the very bytes
that were checked, so the file cannot change in between.
"""

import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, Iterator

import bentoml
import numpy as np
import onnx
import onnxruntime as ort
from bentoml.exceptions import NotFound
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

# Under "bentoml": the server configures that logger at INFO with its handler; the root logger shows warnings only.
logger = logging.getLogger("bentoml.train_to_deploy")

ONNX_FILE = "model.onnx"
CONTRACT_FILE = "contract.json"


@dataclass(frozen=True)
class Slot:
    name: str
    names: tuple[str, ...]  # model names in the store that can fill this slot
    kind: str  # the contract's "kind"
    env: str  # environment variable that pins a tag
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    output_shape: tuple[int, ...]
    how_to: str  # the commands that put a model here


SLOTS = {
    "product": Slot(
        "product", ("product",), "regression", "T2D_PRODUCT_MODEL", (2,), (1,),
        "python -m train --task product && python -m export --checkpoint runs/product/best.pt",
    ),
    "classifier": Slot(
        "classifier", ("fashion-mnist", "mnist"), "classification", "T2D_CLASSIFIER_MODEL", (1, 28, 28), (10,),
        "python -m train --task fashion-mnist --config configs/fashion_mnist_cnn.yaml --out runs/fashion-mnist && "
        "python -m export --checkpoint runs/fashion-mnist/best.pt",
    ),
}


class ModelError(Exception):
    """A slot cannot serve: its model is broken or its pin is wrong. The message is one line for the
    client; `detail`, for the server log only, may hold file paths."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class NoModelError(ModelError):
    """A slot cannot serve because nothing is registered for it yet: expected on a fresh machine."""


@dataclass
class OnnxModel:
    """One exported model, opened: run it on a float32 batch in raw units."""

    tag: str
    contract: dict[str, Any]
    session: ort.InferenceSession
    input_name: str
    output_name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return out


def find(slot: Slot, packed: list[str] | None = None) -> bentoml.Model:
    """The store entry `slot` serves: its pinned tag, else its tag among `packed` (the model tags of the
    Bento being served, None outside a Bento), else the newest entry of its names."""
    pinned = os.environ.get(slot.env, "").strip()
    if pinned:
        try:
            model = bentoml.models.get(pinned)
        except NotFound:
            raise ModelError(f"{slot.env}={pinned} is not in the model store; unset it to serve the newest "
                             f"{slot.name} model, or register that tag") from None
        except Exception as e:  # a malformed tag, or an unreadable entry
            raise ModelError(f"{slot.env}={pinned} cannot be read from the model store (the server log says why)",
                             detail=_first_line(e)) from None
        if model.tag.name not in slot.names:
            raise ModelError(f"{slot.env}={pinned} names a {model.tag.name!r} model; the {slot.name} endpoints "
                             f"serve {' or '.join(slot.names)}")
        return model
    if packed is not None:
        tags = [tag for tag in packed if tag.split(":")[0] in slot.names]
        if not tags:
            raise NoModelError(f"this Bento was built without a {slot.name} model; train and export one: "
                               f"{slot.how_to}; then build the Bento again")
        try:
            return bentoml.models.get(tags[0])
        except NotFound:
            raise ModelError(f"model {tags[0]}, which this Bento was built with, is not in the model store") from None
    candidates = []
    for name in slot.names:
        try:
            candidates += bentoml.models.list(name)
        except NotFound:  # nothing of that name yet
            pass
        except Exception as e:  # e.g. a version folder with a broken model.yaml: say so, try the other names
            logger.error("cannot list %r models in the model store: %s", name, _first_line(e))
    if not candidates:
        raise NoModelError(f"no {' or '.join(slot.names)} model is registered in the model store; "
                           f"train and export one: {slot.how_to}; then restart the server")
    return max(candidates, key=lambda m: m.info.creation_time)


def load(slot: Slot, packed: list[str] | None = None) -> OnnxModel:
    """Find and open the slot's model and check it against the contract the endpoints rely on."""
    model = find(slot, packed)
    tag = str(model.tag)
    try:
        contract = json.loads(read_plain_file(model.path_of(CONTRACT_FILE)))
        _check_contract(slot, contract)
        graph = read_self_contained_onnx(model.path_of(ONNX_FILE))
        options = ort.SessionOptions()
        # One thread per run: these models take 15-250 us, and a second thread made them slower here
        # (the CNN at batch 1: 213 us with 1 thread, 282 us with 2, on 2 shared cores).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        loaded = OnnxModel(tag, contract, session, contract["inputs"][0]["name"], contract["outputs"][0]["name"])
        # One real run now, so a graph that does not match its contract fails here, not on a request.
        out = loaded.run(np.ones((2, *slot.input_shape), dtype=np.float32))
        if out.shape != (2, *slot.output_shape):
            raise ValueError(f"a batch of 2 gave output shape {list(out.shape)}, expected {[2, *slot.output_shape]}")
    except Exception as e:  # anything wrong with the files is the same problem for the client: re-export
        raise ModelError(f"model {tag} in the model store cannot be served (its files are broken or do not match "
                         f"the contract; the server log says why); export it again: {slot.how_to}",
                         detail=_first_line(e)) from None
    return loaded


def load_slot(slot: Slot, packed: list[str] | None = None) -> tuple[OnnxModel | None, str | None, bool]:
    """The opened model, or None and the reason its endpoints give; logs either way. The last item is
    False when the slot should serve a model and cannot (broken files, a wrong pin): not ready."""
    try:
        model = load(slot, packed)
    except ModelError as e:
        log = logger.warning if isinstance(e, NoModelError) else logger.error
        log("%s endpoints unavailable: %s%s", slot.name, e, f"\n  reason: {e.detail}" if e.detail else "")
        return None, str(e), isinstance(e, NoModelError)
    logger.info("%s endpoints serve %s", slot.name, model.tag)
    return model, None, True


def read_plain_file(path: str) -> bytes:
    """The bytes of `path`, which must be a regular file, not a symbolic link (nor a FIFO, whose open
    would block). Opened without following links, then checked, so a link swapped in is refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        if os.path.islink(path):  # O_NOFOLLOW on a link: ELOOP
            raise ValueError(f"{os.path.basename(path)} is a symbolic link (to {os.readlink(path)}); "
                             f"the model store holds plain files only") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{os.path.basename(path)} is not a regular file")
        return f.read()


def read_self_contained_onnx(path: str) -> bytes:
    """The bytes of the ONNX file at `path`, after checking that no tensor keeps its data elsewhere.

    The graph is parsed without loading external data, so a refused file's `location` is never opened."""
    data = read_plain_file(path)
    try:
        graph = onnx.load_from_string(data)
    except DecodeError as e:
        raise ValueError(f"{os.path.basename(path)} is not an ONNX model ({e})") from None
    external = [t for t in _tensors(graph) if uses_external_data(t)]
    if external:
        where = sorted({entry.value for t in external for entry in t.external_data if entry.key == "location"})
        raise ValueError(f"{os.path.basename(path)} refused: {len(external)} tensor(s) keep their data in external "
                         f"file(s) {where}, not read; serve self-contained files, as `python -m export` writes")
    return data


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers (dense and sparse) and node attributes, in the main
    graph, its subgraphs (If, Loop, Scan bodies) and its local functions."""

    def in_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            yield from in_node(node)

    def in_node(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
        for attr in node.attribute:
            tensors = [attr.t] if attr.HasField("t") else []
            sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            graphs = [attr.g] if attr.HasField("g") else []
            yield from [*tensors, *attr.tensors]
            for s in [*sparse, *attr.sparse_tensors]:
                yield from (s.values, s.indices)
            for graph in [*graphs, *attr.graphs]:
                yield from in_graph(graph)

    yield from in_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from in_node(node)


def registered_tags() -> list[str]:
    """The tags the slots would serve now, for `bentoml build` to pack into the Bento."""
    tags = []
    for slot in SLOTS.values():
        try:
            tags.append(str(find(slot).tag))
        except ModelError:
            pass
    return tags


def _check_contract(slot: Slot, contract: dict[str, Any]) -> None:
    (inp,), (out,) = contract["inputs"], contract["outputs"]
    if contract["kind"] != slot.kind:
        raise ValueError(f"its contract says kind {contract['kind']!r}, the {slot.name} endpoints need {slot.kind!r}")
    if list(inp["shape"][1:]) != list(slot.input_shape) or list(out["shape"][1:]) != list(slot.output_shape):
        raise ValueError(f"its contract's shapes {inp['shape']} -> {out['shape']} are not "
                         f"[batch, {slot.input_shape}] -> [batch, {slot.output_shape}]")
    if slot.kind == "classification" and len(contract["classes"]) != slot.output_shape[0]:
        raise ValueError(f"its contract names {len(contract['classes'])} classes, expected {slot.output_shape[0]}")
    if slot.kind == "regression" and len(contract["train_range"]) != slot.input_shape[0]:
        raise ValueError("its contract's train_range does not give one [low, high) per input")


def _first_line(e: Exception) -> str:
    text = f"missing key {e}" if isinstance(e, KeyError) else str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
