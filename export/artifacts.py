"""Trace the raw-units module to ONNX and TorchScript and write them atomically."""

import json
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
            torch.onnx.export(module, example_inputs(task), str(raw), input_names=[i["name"] for i in contract["inputs"]],
                              output_names=[o["name"] for o in contract["outputs"]], dynamic_shapes=(shapes,),
                              external_data=False, verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export failed: {_first_line(e)}") from None
        model = onnx.load(str(raw), load_external_data=False)
    check_graph_io(model, contract)
    save_onnx(model, path, metadata, full_check=True)


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
        traced = torch.jit.trace(module, example_inputs(task))
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
