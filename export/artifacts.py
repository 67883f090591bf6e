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

from t2d.files import atomic_write, first_line

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
FORMATS = ("onnx", "torchscript")

# torch.jit is deprecated in favour of torch.export, but TorchScript is still a format users ask for.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")


class ExportError(Exception):
    """Tracing or checking an artifact failed; the message is one line."""


def example_input(contract: dict[str, Any], batch: int = 3) -> torch.Tensor:
    # Batch 3, not 1: an exporter may specialize a dimension of size 1 to a constant.
    shape = contract["inputs"][0]["shape"][1:]
    return torch.rand(batch, *shape)


def write_onnx(module: nn.Module, contract: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """The dynamo exporter with a dynamic batch axis, one self-contained file, metadata in `metadata_props`."""
    (inp,), (out,) = contract["inputs"], contract["outputs"]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            torch.onnx.export(module, (example_input(contract),), str(raw), input_names=[inp["name"]],
                              output_names=[out["name"]], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              external_data=False, verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export failed: {_first_line(e)}") from None
        model = onnx.load(str(raw), load_external_data=False)
    save_onnx(model, path, metadata, full_check=True)


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


def write_torchscript(module: nn.Module, contract: dict[str, Any], path: Path) -> None:
    """A traced TorchScript module: the networks have no data-dependent control flow."""
    try:
        traced = torch.jit.trace(module, example_input(contract))
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
