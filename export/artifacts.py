"""Trace the raw-units module to ONNX and TorchScript and write them atomically."""

import contextlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.contract import example_inputs
from t2d.files import atomic_write, first_line

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
FORMATS = ("onnx", "torchscript")

# torch.jit is deprecated in favour of torch.export, but TorchScript is still a format users ask for.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
# The exporter says so when two inputs share a size ("batch", or ids and their mask sharing "length"): as meant.
warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)


class ExportError(Exception):
    """Tracing or checking an artifact failed; the message is one line."""


def write_onnx(module: nn.Module, task, contract: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """The dynamo exporter with a dynamic batch axis and a dynamic axis for every variable size (inputs that share
    a size's name share the axis), one self-contained file, metadata in `metadata_props`; then the graph is
    checked to take what the task declares (`check_graph_io`)."""
    batch = torch.export.Dim("batch")
    dims = {name: torch.export.Dim(name, max=i.max_length) for i in task.inputs for name in i.dims}
    shapes = tuple({0: batch, **{axis: dims[name] for axis, name in i.axis_dims.items()}} for i in task.inputs)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with quiet_torch():
                torch.onnx.export(module, example_inputs(task), str(raw), dynamic_shapes=(shapes,),
                                  external_data=False, verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export failed: {_first_line(e)}") from None
        model = onnx.load(str(raw), load_external_data=False)
    name_io(model, [i["name"] for i in contract["inputs"]], [o["name"] for o in contract["outputs"]])
    check_graph_io(model, contract)
    save_onnx(model, path, metadata, full_check=True)


@contextlib.contextmanager
def quiet_torch():
    """torch's own loggers off while exporting: where a network fixes a size the exporter was told varies, it logs
    each failed guard with a traceback and then exports the fixed size anyway, which `check_graph_io` turns into
    the one line a user needs."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def name_io(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> None:
    """Give the graph's inputs and outputs the contract's names. Done here rather than by the exporter's
    input_names/output_names, which rename without looking: an output called "embedding" collided with the value
    of the network's own nn.Embedding, also "embedding", and the graph broke (single assignment). A value that
    already has a wanted name is renamed out of the way first."""
    g = model.graph
    if len(g.input) < len(inputs) or len(g.output) != len(outputs):
        found = ([v.name for v in g.input], [v.name for v in g.output])
        raise ExportError(f"the ONNX graph takes {len(found[0])} input(s) and gives {len(found[1])} output(s), the "
                          f"task declares {len(inputs)} and {len(outputs)}")
    wanted = dict(zip([v.name for v in g.input][:len(inputs)] + [v.name for v in g.output], inputs + outputs))
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {t.name for t in g.initializer} \
        | {v.name for v in (*g.input, *g.output, *g.value_info)}
    moved = {}
    for new in wanted.values():
        if new in taken and new not in wanted:  # another value has the name: give it a fresh one
            fresh = next(f"{new}_{k}" for k in range(len(taken) + 1) if f"{new}_{k}" not in taken)
            moved[new] = fresh
            taken.add(fresh)
    _rename(g, moved)
    _rename(g, wanted)


def _rename(g: onnx.GraphProto, names: dict[str, str]) -> None:
    if not names:
        return
    for node in g.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for v in (*g.input, *g.output, *g.value_info, *g.initializer):
        v.name = names.get(v.name, v.name)


ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64, "bool": onnx.TensorProto.BOOL}


def check_graph_io(model: onnx.ModelProto, contract: dict[str, Any]) -> None:
    """ExportError (one line) unless the graph takes every declared input with its dtype and keeps each declared
    variable size (and the batch) dynamic: an input the network never reads is dropped by the exporter, and a
    size the network fixes is traced as a constant, and either would surface only as a server's failures."""
    for key, graph_side in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        found = {v.name: v for v in graph_side}
        for entry in contract[key]:
            v = found.get(entry["name"])
            what = f"{key[:-1]} {entry['name']}"
            if v is None:
                why = " (the network never reads it, so the exporter left it out)" if key == "inputs" else ""
                raise ExportError(f"the ONNX graph has no {what}{why}")
            t = v.type.tensor_type
            if t.elem_type != ONNX_TYPES[entry["dtype"]]:
                raise ExportError(f"the ONNX graph's {what} is {onnx.TensorProto.DataType.Name(t.elem_type)}, "
                                  f"the task declares {entry['dtype']}")
            got = [d.dim_param or d.dim_value for d in t.shape.dim]
            if len(got) != len(entry["shape"]):
                raise ExportError(f"the ONNX graph's {what} has {len(got)} axes, the task declares "
                                  f"{len(entry['shape'])}")
            for axis, (g, want) in enumerate(zip(got, entry["shape"])):
                if isinstance(want, str) and not isinstance(g, str):
                    raise ExportError(f"the network fixes axis {axis} ({want}) of {what} to {g}: the graph would take "
                                      f"no other size; make the network work for any {want}")
                if isinstance(want, int) and g != want:
                    raise ExportError(f"the ONNX graph's {what} has size {g} on axis {axis}, the task declares {want}")


def save_onnx(model: onnx.ModelProto, path: Path, metadata: dict[str, str], full_check: bool) -> None:
    """Add `metadata` to `model`'s metadata_props, write it atomically, then check the written file."""
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "train-to-deploy"
    atomic_write(path, model.SerializeToString())
    try:
        onnx.checker.check_model(str(path), full_check=full_check)
    except Exception as e:
        raise ExportError(f"{path} fails onnx.checker: {_first_line(e)}") from None


def write_torchscript(module: nn.Module, task, path: Path) -> None:
    """A traced TorchScript module: the networks have no data-dependent control flow."""
    try:
        # check_trace off: its re-run compares graphs, and a Transformer's fast path differs between runs in
        # ways that do not change outputs; parity, at several sizes, compares outputs.
        traced = torch.jit.trace(module, example_inputs(task), check_trace=False)
    except Exception as e:
        raise ExportError(f"TorchScript trace failed: {_first_line(e)}") from None
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        torch.jit.save(traced, str(Path(tmp) / "m.pt"))
        os.replace(Path(tmp) / "m.pt", path)


def onnx_metadata(contract: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
    """ONNX `metadata_props` are strings: the contract and friends as JSON."""
    props = {"contract": contract, **extra}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}


def _first_line(e: Exception) -> str:
    return first_line(e, 300)
