"""Which exported models this server serves, opened with onnxruntime once per worker process.

What `python -m export` registers (one BentoML model per export, named after its task):
`model.onnx` (raw units in and out, normalization inside the graph, dynamic batch axis) and
`contract.json` (input and output names, dtypes and shapes, valid ranges, class names, training
range; `serve.contract`).

Every model name in the store is served over the Open Inference Protocol (`serve.v2`), each at one
version: the newest by creation time, unless pinned. Pins, in the environment:

    T2D_MODELS="product:abc,mydata:xyz"   # pin any names; "-name" leaves a name out (e.g. "-mnist")
    T2D_PRODUCT_MODEL=product:abc          # the product slot's pin (kept from before T2D_MODELS)
    T2D_CLASSIFIER_MODEL=fashion-mnist:xyz # the classifier slot's pin; also pins that name

A built Bento serves exactly the models it was built with (the tags in its bento.yaml, every name that
`registered_tags` gave at build time), not whatever is newest in the store where it runs; pins still
win, as they are explicit.

A slot is a group of typed endpoints over one of those models: `product` serves /predict and
/predict_batch from the model named `product`; `classifier` serves /classify and /classify_png from
`fashion-mnist` or `mnist`, whichever is served at the newer version (or the one its pin names).
The typed endpoints also check the model has the shapes they were written for.

Each served model is loaded once, here, and shared by the typed endpoints and /v2 (`Registry`). A
model that fails to load (broken files, a contract that disagrees with its graph, a wrong pin) is
logged at ERROR with the reason, answers 503 with a one-line reason on its endpoints, and keeps
/readyz at 503; every other model is served regardless. A slot with nothing registered does not
hold readiness back: its endpoints answer 503 with how to fill it.

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
from dataclasses import dataclass, field
from typing import Any, Iterator

import bentoml
import numpy as np
import onnx
import onnxruntime as ort
from bentoml.exceptions import NotFound
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

from serve.contract import Signature, TensorSpec, check_graph, output_shape, signature_of, trial_inputs
from t2d import selfcheck  # torch-free, as t2d.cpu and t2d.files
from t2d.cpu import cpu_info, describe
from t2d.files import first_line  # the one one-line-error helper of train, export and serve

# Under "bentoml": the server configures that logger at INFO with its handler; the root logger shows warnings only.
logger = logging.getLogger("bentoml.train_to_deploy")

ONNX_FILE = "model.onnx"
CONTRACT_FILE = "contract.json"
PINS_ENV = "T2D_MODELS"
VARIANTS = ("fp32", "int8", "fp16")  # what `python -m export` registers (label "variant"; none: fp32)


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


def how_to(name: str) -> str:
    for slot in SLOTS.values():
        if name in slot.names:
            return slot.how_to
    return f"python -m export --checkpoint <the {name} run's best.pt>"


class ModelError(Exception):
    """A model cannot be served: it is broken or its pin is wrong. The message is one line for the
    client; `detail`, for the server log only, may hold file paths."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class NoModelError(ModelError):
    """A slot cannot serve because nothing is registered for it yet: expected on a fresh machine."""


class ModelRunError(RuntimeError):
    """onnxruntime failed on input that passed validation: the model's fault, not the client's."""

    status = 500  # as serve.validate.InputError's, so the typed endpoints answer both alike


@dataclass
class OnnxModel:
    """One exported model, opened: run it on float32 batches in raw units."""

    tag: str
    contract: dict[str, Any]
    session: ort.InferenceSession
    signature: Signature

    @property
    def name(self) -> str:
        return self.tag.split(":")[0]

    @property
    def version(self) -> str:
        return self.tag.split(":")[1]

    @property
    def variant(self) -> str:
        """fp32, or the quantized variant (int8, fp16) that `python -m export --quantize` registered."""
        return str(self.contract.get("variant") or "fp32")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.signature.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.signature.outputs

    def run(self, x: np.ndarray) -> np.ndarray:
        """The first output for the first input (the typed endpoints' models have one of each)."""
        (out,) = self.run_named({self.inputs[0].name: x}, [self.outputs[0].name])
        return out

    def run_named(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        try:
            return self.session.run(outputs, feeds)
        except Exception as e:  # onnxruntime's Fail, InvalidArgument, RuntimeException... have no common base
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            logger.error("model %s failed on valid input (%s): %s", self.tag, shapes, e)
            reason = first_line(e).split(" Status Message:")[0]  # the rest names onnxruntime's source files
            raise ModelRunError(f"model {self.tag} failed on this input ({shapes}): {reason}; "
                                f"the server log has the details") from e


@dataclass
class Served:
    """One model name: the version this server serves, opened, or why it cannot be."""

    name: str
    tag: str | None  # None when no entry could be chosen (a pin that is not in the store)
    model: OnnxModel | None
    error: ModelError | None
    versions: frozenset[str] = frozenset()  # every version of the name in the store
    created: float = 0.0  # the served entry's creation time (POSIX seconds)


@dataclass
class Registry:
    """Everything this worker serves: one entry per model name, and the typed endpoints' slots."""

    models: dict[str, Served]
    slots: dict[str, tuple[OnnxModel | None, str | None]] = field(default_factory=dict)  # model, or the 503 reason
    ready: bool = True


# --- choosing a version of each name -------------------------------------------------------------

def read_pins() -> tuple[dict[str, tuple[str, str]], set[str], list[str]]:
    """The pins in the environment: name -> (the setting that pins it, tag, or name@variant for the newest
    entry of that variant); the names left out; and one line per setting that cannot be used (a malformed
    item, two pins of one name that disagree)."""
    pins: dict[str, tuple[str, str]] = {}
    excluded: set[str] = set()
    problems: list[str] = []

    def pin(setting: str, tag: str) -> None:
        name = tag.split(":")[0].split("@")[0]
        if name in pins and pins[name][1] != tag:
            problems.append(f"{pins[name][0]}={pins[name][1]} and {setting}={tag} pin {name!r} to different versions")
        pins.setdefault(name, (setting, tag))

    for item in filter(None, (i.strip() for i in os.environ.get(PINS_ENV, "").split(","))):
        name, colon, version = item.partition(":")
        base, at, variant = item.partition("@")
        if item.startswith("-") and not colon and not at and len(item) > 1:
            excluded.add(item[1:])
        elif name and colon and version and ":" not in version and not at:
            pin(PINS_ENV, item)
        elif base and at and variant in VARIANTS and not colon:
            pin(PINS_ENV, item)
        else:
            problems.append(f"{PINS_ENV} item {item!r} is none of name:version, name@variant "
                            f"({'|'.join(VARIANTS)}) or -name")
    for slot in SLOTS.values():
        tag = os.environ.get(slot.env, "").strip()
        if tag and tag.split(":")[0] in slot.names:  # a pin of another name is the slot's error, not a pin
            pin(slot.env, tag)
    return pins, excluded, problems


def store_names() -> list[str]:
    """Every model name in the store. Read from the store's folder, not bentoml.models.list(): that
    reads every entry's model.yaml and fails as a whole on one broken entry; here it breaks its own name."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    folder = BentoMLContainer.model_store_dir.get()
    try:
        return sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    except FileNotFoundError:
        return []


def _versions(name: str) -> list[bentoml.Model]:
    try:
        return bentoml.models.list(name)
    except NotFound:
        return []


def choose(packed: list[str] | None = None) -> tuple[dict[str, Served], list[str]]:
    """The entry to serve for each name (opened later): the pinned tag, else its tag among `packed` (the
    model tags of the Bento being served, None outside a Bento), else the newest. Returns unopened
    `Served` (model None; error set when no entry can be used) and the pins' problems."""
    pins, excluded, problems = read_pins()
    in_bento = {tag.split(":")[0]: tag for tag in packed} if packed is not None else None
    names = set(in_bento) if in_bento is not None else set(store_names())
    chosen = {}
    for name in sorted((names | set(pins)) - excluded):
        try:
            entries = _versions(name)
            versions = frozenset(m.tag.version for m in entries)
        except Exception as e:  # e.g. a version folder with a broken model.yaml
            chosen[name] = Served(name, None, None, ModelError(
                f"model {name} cannot be listed in the model store (the server log says why)", detail=first_line(e, 300)))
            continue
        try:
            if name in pins and "@" in pins[name][1]:
                setting, item = pins[name]
                variant = item.split("@")[1]
                matching = [m for m in entries if (m.info.labels.get("variant") or "fp32") == variant]
                if not matching:
                    raise ModelError(f"{setting}={item}: no {variant} entry of model {name} is in the model store; "
                                     f"export one (python -m export --quantize {variant}) or unset the pin")
                entry = max(matching, key=lambda m: m.info.creation_time)
            elif name in pins:
                setting, tag = pins[name]
                entry = _get(tag, f"{setting}={tag}",
                             f"unset it to serve the newest {name} model, or register that tag")
            elif in_bento is not None:
                entry = _get(in_bento[name], f"model {in_bento[name]}, which this Bento was built with,",
                             "build the Bento again")
            elif entries:
                entry = max(entries, key=lambda m: m.info.creation_time)
            else:
                continue  # an empty folder
            chosen[name] = Served(name, str(entry.tag), None, None, versions, entry.info.creation_time.timestamp())
        except ModelError as e:
            chosen[name] = Served(name, None, None, e, versions)
        except Exception as e:
            chosen[name] = Served(name, None, None, ModelError(
                f"model {name} cannot be read from the model store (the server log says why)", detail=first_line(e, 300)),
                versions)
    return chosen, problems


def _get(tag: str, what: str, fix: str) -> bentoml.Model:
    try:
        return bentoml.models.get(tag)
    except NotFound:
        raise ModelError(f"{what} is not in the model store; {fix}") from None
    except Exception as e:  # a malformed tag, or an unreadable entry
        raise ModelError(f"{what} cannot be read from the model store (the server log says why)",
                         detail=first_line(e, 300)) from None


# --- opening one entry ---------------------------------------------------------------------------

def open_model(tag: str) -> OnnxModel:
    """Open the store entry `tag`: its contract, its graph (self-contained), the two checked against
    each other, and one real run of a batch of 2; ModelError with the reason otherwise."""
    try:
        entry = bentoml.models.get(tag)
        contract = json.loads(read_plain_file(entry.path_of(CONTRACT_FILE)))
        signature = signature_of(contract)
        graph = read_self_contained_onnx(entry.path_of(ONNX_FILE))
        options = ort.SessionOptions()
        # One thread per run: these models take 15-250 us, and a second thread made them slower here
        # (the CNN at batch 1: 213 us with 1 thread, 282 us with 2, on 2 shared cores).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        check_graph(signature, session.get_inputs(), session.get_outputs())
        model = OnnxModel(tag, contract, session, signature)
        # One real run now, so a graph that does not compute what its metadata says fails here, not on a request.
        trial = trial_inputs(signature)
        outs = model.run_named(trial, [o.name for o in signature.outputs])
        sizes = {d: trial[i.name].shape[axis + 1] for i in signature.inputs
                 for axis, d in enumerate(i.sample_shape) if isinstance(d, str)}
        for spec, out in zip(signature.outputs, outs):
            want = output_shape(spec, 2, sizes)
            if out.shape != want or out.dtype != spec.np_dtype:
                raise ValueError(f"a batch of 2 gave output {spec.name!r} of shape {list(out.shape)} and dtype "
                                 f"{out.dtype}, expected {list(want)} and {spec.dtype}")
        check_variant(model, entry)
    except ModelError:
        raise
    except Exception as e:  # anything wrong with the files is the same problem for the client: re-export
        raise ModelError(f"model {tag} in the model store cannot be served (its files are broken or do not match "
                         f"the contract; the server log says why); export it again: {how_to(tag.split(':')[0])}",
                         detail=first_line(e, 300)) from None
    return model


def check_variant(model: OnnxModel, entry: bentoml.Model) -> None:
    """A quantized variant must give, on this CPU, the answers it gave where it was exported: run it on its stored
    self-check rows (`t2d.selfcheck`) and refuse it (ModelError) when it agrees less with the float model."""
    if model.variant == "fp32":
        return
    path = entry.path_of(selfcheck.FILE)
    if not os.path.lexists(path):  # exported before variants carried one: nothing to check against
        logger.warning("model %s (%s) has no %s, so it is served unchecked on %s; export it again to have it "
                       "checked", model.tag, model.variant, selfcheck.FILE, describe())
        return
    meta, feeds, reference = selfcheck.read(read_plain_file(path))
    (got,) = model.run_named(feeds, [meta["output"]])
    try:
        here = selfcheck.check(meta, reference, got, cpu_info())
    except selfcheck.SelfCheckError as e:
        name = model.name
        raise ModelError(f"model {model.tag} ({model.variant}) is not served: it failed its self-check on this CPU "
                         f"(the server log says why); serve the float model with {PINS_ENV}={name}@fp32, or export "
                         f"the variant again in the portable int8 format", detail=f"self-check: {e}") from None
    logger.info("model %s (%s) passed its self-check on %s: %.1f%% agreement with the float model (export "
                "measured %.1f%%)", model.tag, model.variant, describe(), 100 * here, 100 * meta["agreement"])


# --- everything, once per worker -----------------------------------------------------------------

def load_registry(packed: list[str] | None = None, names: tuple[str, ...] | None = None) -> Registry:
    """Choose, open and log every model this server serves (or only `names`), and fill the slots."""
    chosen, problems = choose(packed)
    if names is not None:
        chosen = {n: s for n, s in chosen.items() if n in names}
    for served in chosen.values():
        if served.error is None:
            try:
                served.model = open_model(served.tag)
            except ModelError as e:
                served.error = e
    registry = Registry(chosen, ready=not problems)
    for line in problems:
        logger.error("%s; fix it and restart the server", line)
    backs: dict[str, list[str]] = {}  # model name -> the slots it fills
    slot_errors = {}
    for slot in SLOTS.values():
        if names is not None and not set(slot.names) & set(names):
            continue
        try:
            served = _slot_model(slot, chosen, packed)
            backs.setdefault(served.name, []).append(slot.name)
            if served.error is not None:
                registry.slots[slot.name] = (None, str(served.error))
                continue
            _check_slot(slot, served.model)
            registry.slots[slot.name] = (served.model, None)
        except ModelError as e:
            registry.slots[slot.name] = (None, str(e))
            slot_errors[slot.name] = e
    for served in chosen.values():
        slots = backs.get(served.name, [])
        if served.error is None:
            logger.info("/v2/models/%s serves %s", served.name, served.tag)
            continue
        registry.ready = False
        also = "".join(f" and the {s} endpoints" for s in slots)
        e = served.error
        logger.error("/v2/models/%s%s unavailable: %s%s", served.name, also, e,
                     f"\n  reason: {e.detail}" if e.detail else "")
    for name, (model, error) in registry.slots.items():
        if model is not None:
            logger.info("%s endpoints serve %s", name, model.tag)
        elif name in slot_errors:  # the slot's own problem; a model's is logged above
            e = slot_errors[name]
            registry.ready &= isinstance(e, NoModelError)
            (logger.warning if isinstance(e, NoModelError) else logger.error)(
                "%s endpoints unavailable: %s%s", name, e, f"\n  reason: {e.detail}" if e.detail else "")
    return registry


def _slot_model(slot: Slot, chosen: dict[str, Served], packed: list[str] | None) -> Served:
    """The served model behind `slot`: its pin's, else the newest among its names'."""
    pinned = os.environ.get(slot.env, "").strip()
    if pinned:
        name = pinned.split(":")[0]
        if name not in slot.names:
            raise ModelError(f"{slot.env}={pinned} names a {name!r} model; the {slot.name} endpoints "
                             f"serve {' or '.join(slot.names)}")
        if name not in chosen:
            raise ModelError(f"{slot.env}={pinned} names a model that {PINS_ENV} leaves out")
        return chosen[name]
    candidates = [chosen[n] for n in slot.names if n in chosen]
    usable = [s for s in candidates if s.tag is not None]
    if usable:
        return max(usable, key=lambda s: s.created)
    if candidates:  # listed, but no entry could be chosen: say why
        return candidates[0]
    if packed is not None:
        raise NoModelError(f"this Bento was built without a {slot.name} model; train and export one: "
                           f"{slot.how_to}; then build the Bento again")
    raise NoModelError(f"no {' or '.join(slot.names)} model is registered in the model store; "
                       f"train and export one: {slot.how_to}; then restart the server")


def _check_slot(slot: Slot, model: OnnxModel) -> None:
    """ModelError unless `model` has what the slot's typed endpoints were written for."""
    sig, contract = model.signature, model.contract
    problem = None
    if contract["kind"] != slot.kind:
        problem = f"its contract says kind {contract['kind']!r}, the {slot.name} endpoints need {slot.kind!r}"
    elif len(sig.inputs) != 1 or sig.inputs[0].sample_shape != slot.input_shape \
            or sig.outputs[0].sample_shape != slot.output_shape:
        problem = (f"its inputs {[i.metadata() for i in sig.inputs]} and first output {sig.outputs[0].metadata()} "
                   f"are not [-1, {list(slot.input_shape)}] -> [-1, {list(slot.output_shape)}]")
    elif slot.kind == "regression" and contract.get("train_range") is None:
        problem = "its contract has no train_range, which the product endpoints' extrapolated flag needs"
    if problem:
        raise ModelError(f"model {model.tag} cannot serve the {slot.name} endpoints (the server log says why); "
                         f"serve it over /v2/models/{model.name}, or export one for them: {slot.how_to}",
                         detail=problem)


def load(slot: Slot, packed: list[str] | None = None) -> OnnxModel:
    """The model behind `slot`, opened; ModelError (NoModelError when nothing is registered) otherwise."""
    chosen, _ = choose(packed)
    served = _slot_model(slot, chosen, packed)
    if served.error is not None:
        raise served.error
    model = open_model(served.tag)
    _check_slot(slot, model)
    return model


def load_slot(slot: Slot, packed: list[str] | None = None) -> tuple[OnnxModel | None, str | None, bool]:
    """The opened model, or None and the reason its endpoints give; logs either way. The last item is
    False when the slot should serve a model and cannot (broken files, a wrong pin): not ready."""
    registry = load_registry(packed, names=slot.names)
    model, error = registry.slots[slot.name]
    return model, error, registry.ready


def registered_tags() -> list[str]:
    """The tags this server would serve now (every name, pins applied), for `bentoml build` to pack."""
    chosen, _ = choose()
    return [s.tag for s in chosen.values() if s.tag is not None]


# --- reading files safely ------------------------------------------------------------------------

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



