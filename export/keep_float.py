"""Which layers of an int8 variant stay float32: the user's pins (`--keep-float`), and the per-layer selection.

A layer is a node with weights or a matrix product (Conv, Gemm, MatMul, Gather...), named by the torch
module it came from (`net.fc`, `net.features.0.0`), else by its node name. Keeping a layer float means
onnxruntime's quantizer leaves that node and its activation tail alone: its weights and its output stay
float32. One layer whose weights int8 cannot hold (one weight a thousand times the rest of its channel
rounds the rest to zero) can cost a whole model its accuracy, and keeping just that layer float saves it.

The selection reads only a validation sample of the training split, never the test split, which the
gate reads once afterwards: first the variant with every layer int8 (and the pins float); if it is within
the bound, nothing more. Otherwise each layer is tried alone in float, the layers are ranked by how much of
the loss each one recovers, and they are kept float in that order until the variant is within the bound.
"""

import ast
from dataclasses import dataclass
from typing import Any, Callable

import onnx

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Attention", "LSTM")


@dataclass(frozen=True)
class Layer:
    node: str  # the node's name in the prepared float graph
    op: str
    module: str  # the torch module it came from, or ""
    head: tuple[str, ...] = ()  # the nodes its input passes through after the layer before (ReLU, pooling...)
    tail: tuple[str, ...] = ()  # the nodes its output passes through before the next layer

    @property
    def label(self) -> str:
        return self.module or self.node

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "module": self.module}


def layers(model: onnx.ModelProto) -> list[Layer]:
    """The graph's quantizable layers, in graph order."""
    weights = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: node for node in model.graph.node for o in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or (node.op_type == "Gather" and node.input[0] not in weights):
            continue  # a Gather that indexes activations (a Transformer's select) has nothing to quantize
        tail, last = [], node
        while len(last.output) == 1 and len(consumers.get(last.output[0], [])) == 1:
            last = consumers[last.output[0]][0]
            if last.op_type in LAYER_OPS:
                break
            tail.append(last.name)
        head, first = [], node
        while first.input and (before := producer.get(first.input[0])) is not None \
                and before.op_type not in LAYER_OPS and len(consumers.get(first.input[0], [])) == 1:
            head.insert(0, before.name)
            first = before
        found.append(Layer(node.name, node.op_type, _module_of(node, weights), tuple(head), tuple(tail)))
    return found


def _module_of(node: onnx.NodeProto, weights: set[str]) -> str:
    """The torch module of the node: the owner of its weight (the exporter names initializers by parameter,
    `net.fc.weight`; a Conv with a BatchNorm fused into it keeps the Conv's weight name), else the innermost
    module in the exporter's name scopes (['', 'net', 'net.fc', 'linear_1']: the last entry is the op)."""
    for name in node.input:
        if name in weights and name.endswith(".weight"):
            return name[:-len(".weight")]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    return ""


def resolve(candidates: list[Layer], names: tuple[str, ...]) -> list[Layer]:
    """The layers `names` pick (each a module path or a node name); ValueError naming the choices otherwise."""
    picked = []
    for name in names:
        match = [layer for layer in candidates if name in (layer.module, layer.node)]
        if not match:
            choices = ", ".join(dict.fromkeys(layer.label for layer in candidates)) or "none"
            raise ValueError(f"--keep-float {name}: no quantizable layer of that name; this model's are: {choices}")
        picked += [layer for layer in match if layer not in picked]
    return picked


def excluded_nodes(kept: list[Layer]) -> list[str]:
    """The node names to give onnxruntime's quantizer as nodes_to_exclude: each layer with its head and tail, so
    that the layer neither reads a dequantized tensor nor writes one that is quantized again. A float Conv between
    a DequantizeLinear and a QuantizeLinear is not left float: onnxruntime's session optimizer quantizes its
    weights per tensor to fuse it into an int8 convolution (seen with 1.32), which undoes the choice. Its dynamic
    quantizer first splits a Gemm into `<name>_MatMul` and `<name>_Add`, so those names are given too."""
    return [n for layer in kept for n in (*layer.head, layer.node, f"{layer.node}_MatMul", *layer.tail)]


@dataclass
class Trial:
    kept: list[Layer]
    loss: float  # accuracy points lost, or % added to the mean relative error, on validation
    passed: bool
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kept_float": [layer.label for layer in self.kept], "loss": self.loss, "passed": self.passed,
                **{k: v for k, v in self.metrics.items() if k not in ("passed",)}}


def select(candidates: list[Layer], pinned: list[Layer], attempt: Callable[[list[Layer]], Trial],
           ) -> tuple[list[Layer], list[Trial]]:
    """The fewest layers (beyond `pinned`) to keep float for the variant to pass on validation, found greedily
    as the module docstring says, and every trial made. When no choice passes, every layer that helped is
    kept and the gate will say how far off the variant is."""
    first = attempt(pinned)
    trials = [first]
    if first.passed:
        return pinned, trials
    alone = []
    for layer in (c for c in candidates if c not in pinned):
        trial = attempt([*pinned, layer])
        trials.append(trial)
        alone.append((first.loss - trial.loss, layer, trial))
    passing = [(t.loss, i) for i, (_, _, t) in enumerate(alone) if t.passed]
    if passing:  # one layer is enough: the one that leaves the least loss
        return [*pinned, alone[min(passing)[1]][1]], trials
    kept = list(pinned)
    for gain, layer, _ in sorted(alone, key=lambda a: -a[0]):
        if gain <= 0:
            break
        kept.append(layer)
        trial = attempt(kept)
        trials.append(trial)
        if trial.passed:
            break
    return kept, trials
