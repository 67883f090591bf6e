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
endpoints answer with 503; the other slot serves regardless.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort
from bentoml.exceptions import NotFound

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
        with open(model.path_of(CONTRACT_FILE)) as f:
            contract = json.load(f)
        _check_contract(slot, contract)
        options = ort.SessionOptions()
        # One thread per run: these models take 15-250 us, and a second thread made them slower here
        # (the CNN at batch 1: 213 us with 1 thread, 282 us with 2, on 2 shared cores).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model.path_of(ONNX_FILE), options, providers=["CPUExecutionProvider"])
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


def load_slot(slot: Slot, packed: list[str] | None = None) -> tuple[OnnxModel | None, str | None]:
    """The opened model, or None and the reason its endpoints give; logs either way."""
    try:
        model = load(slot, packed)
    except ModelError as e:
        log = logger.warning if isinstance(e, NoModelError) else logger.error
        log("%s endpoints unavailable: %s%s", slot.name, e, f"\n  reason: {e.detail}" if e.detail else "")
        return None, str(e)
    logger.info("%s endpoints serve %s", slot.name, model.tag)
    return model, None


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
