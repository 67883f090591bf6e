"""The checkpoint format: one self-describing dict, written atomically, read with `weights_only=True`.

Keys (all plain Python types or tensors, so `torch.load(..., weights_only=True)` accepts them):
  format, format_version   identify the file as ours
  task, arch, model_config everything needed to rebuild the network
  state_dict               weights of the whole `Predictor`, normalization buffers included
  normalization            the same statistics as plain lists, for people and for serving
  input_shape, classes     what one input sample is and what the outputs mean
  metrics, epoch           validation metrics of this epoch (1-based count of epochs done)
  config                   the resolved run config
  resume                   optimizer, scheduler, grad-scaler and early-stopping state (train only);
                           the RNG state needs no entry: training reseeds torch every epoch from
                           (config.run.seed, epoch, rank)
"""

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from models import Predictor, build_predictor

FORMAT = "train-to-deploy/checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("task", "arch", "model_config", "state_dict", "epoch")


class CheckpointError(Exception):
    """A file that is missing, unreadable, or not one of our checkpoints; the message is one line."""


def serialize(payload: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes: serialize once, write to last.pt and best.pt alike."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, buf)
    return buf.getvalue()


def save_checkpoint(payload: dict[str, Any] | bytes, path: str | os.PathLike) -> None:
    """Write a checkpoint (a payload dict, or bytes from `serialize`) to `path` atomically:
    a temp file in the same folder, fsync, then rename. A crash mid-write leaves the previous
    file intact, never a truncated one.
    """
    data = payload if isinstance(payload, bytes) else serialize(payload)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and unsafe-global errors all mean "not a checkpoint we can read"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a loadable PyTorch file ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a train-to-deploy checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}; this toolkit reads up to {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def predictor_from_checkpoint(ckpt: dict[str, Any]) -> Predictor:
    """Rebuild the trained Predictor from a loaded checkpoint alone, in eval mode."""
    try:
        model = build_predictor(ckpt["arch"], ckpt["model_config"])
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint does not match its architecture {ckpt.get('arch')!r}: {str(e).splitlines()[0]}") from None
    return model.eval()
