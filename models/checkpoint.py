"""The checkpoint format: one self-describing dict, written atomically, read with `weights_only=True`.

Keys (all plain Python types or tensors, so `torch.load(..., weights_only=True)` accepts them):
  format, format_version   identify the file as ours
  task, task_ref, kind     the task's name; for a user's own task, the --task it was trained with
                           (never imported because a checkpoint names it: `python -m export` asks for --task)
  arch, model_config       with the task, everything needed to rebuild the network
  state_dict               weights of the whole `Predictor`, normalization buffers included
  normalization            the same statistics as plain lists, for people ({"inputs": {name: ...}, "target"})
  inputs, classes          each input's name, dtype and shape (None for a size that varies), the class names
  metrics, epoch           validation metrics of this epoch (1-based count of epochs done)
  config                   the resolved run config
  resume                   optimizer, scheduler, grad-scaler and early-stopping state (train only);
                           the RNG state needs no entry: training reseeds torch every epoch from
                           (config.run.seed, epoch, rank)
"""

import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from models import Predictor, build_predictor
from t2d.files import atomic_write, first_line  # noqa: F401 (first_line: imported from here by train and export)

FORMAT = "train-to-deploy/checkpoint"
# 2: networks sized by their task (no in_features / num_classes in model_config), image pixels in [0, 1].
# 3: several inputs: one standardizer per float input, `input_norms.<position>.*` (was `input_norm.*`).
FORMAT_VERSION = 3
REQUIRED = ("task", "arch", "model_config", "state_dict", "epoch")
V1_IMAGE_ARCHS = ("mlp", "cnn")  # version 1 trained these on pixels 0..255


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
    atomic_write(path, payload if isinstance(payload, bytes) else serialize(payload))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", task=None) -> dict[str, Any]:
    """Read and check a checkpoint; raises CheckpointError with a one-line reason.

    Its weights are checked against the network of `task` (a t2d.Task), or of its own task when that is
    built in; a user's task the caller has not given yet is checked by `validate_checkpoint` later."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and unsafe-global errors all mean "not a checkpoint we can read"
        # torch's message opens with advice to switch the safe loader off: report its actual finding instead.
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\n|$)", str(e))
        if found and found.group(1).startswith("Unsupported global"):
            raise CheckpointError(f"cannot read checkpoint {path}: it pickles code or objects other than tensors "
                                  f"and plain data, which are never loaded ({found.group(1)[:200]})") from None
        reason = found.group(1) if found and found.group(1) else re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))
        raise CheckpointError(f"cannot read checkpoint {path}: not a loadable PyTorch file ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a train-to-deploy checkpoint (no '{FORMAT}' format marker)")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this toolkit reads up to {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"checkpoint {path} has no valid epoch count ({epoch!r})")
    if not isinstance(ckpt["task"], str) or not isinstance(ckpt["model_config"], dict):
        raise CheckpointError(f"checkpoint {path} has no valid task name or model_config")
    if version < 2:
        _upgrade_v1(ckpt)
    if version < 3:
        _upgrade_v2(ckpt)
    if task is None:
        import t2d

        task = t2d.builtin_tasks().get(ckpt["task"]) if not ckpt.get("task_ref") else None
    if task is not None:
        validate_checkpoint(ckpt, task, f"checkpoint {path}")
    return ckpt


def _upgrade_v1(ckpt: dict[str, Any]) -> None:
    """A version-1 checkpoint in today's terms: sizes left to the task, image statistics in [0, 1] units."""
    for d in (ckpt["model_config"], (ckpt.get("config") or {}).get("model") or {}):
        d.pop("in_features", None)
        d.pop("num_classes", None)
    if ckpt["arch"] in V1_IMAGE_ARCHS and isinstance(ckpt.get("state_dict"), dict):
        for key in ("input_norm.mean", "input_norm.std"):
            if isinstance(ckpt["state_dict"].get(key), torch.Tensor):
                ckpt["state_dict"][key] = ckpt["state_dict"][key] / 255.0
        norm = (ckpt.get("normalization") or {}).get("input")
        if isinstance(norm, dict):
            ckpt["normalization"]["input"] = {k: [v / 255.0 for v in vs] if isinstance(vs, list) else vs
                                              for k, vs in norm.items()}


def _upgrade_v2(ckpt: dict[str, Any]) -> None:
    """A version-1 or -2 checkpoint's one input standardizer under the name version 3 gives the first input's."""
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict):
        ckpt["state_dict"] = {("input_norms.0." + k[len("input_norm."):] if isinstance(k, str) and
                               k.startswith("input_norm.") else k): v for k, v in sd.items()}


def validate_checkpoint(ckpt: dict[str, Any], task, name: str = "checkpoint") -> None:
    """Raise CheckpointError (one line, starting with `name`) unless the checkpoint's weights are exactly
    those of a fresh network of its architecture: the same keys, shapes and dtypes, and all finite.

    load_state_dict alone is not enough: it casts float64 or integer weights to float32 without a
    word, and accepts NaN. The expected weights come from a network built on the meta device, so a
    config that asks for a huge network costs no memory.
    """
    arch = ckpt.get("arch")
    if ckpt.get("task") != task.name:
        raise CheckpointError(f"{name} was trained on task {ckpt.get('task')!r}, not {task.name!r}")

    def expected_weights(device: str) -> dict[str, torch.Tensor]:
        with torch.device(device):
            return build_predictor(task, arch, ckpt.get("model_config")).state_dict()

    try:
        try:
            expected = expected_weights("meta")
        except RuntimeError:  # a user's network whose __init__ needs real values (.item(), numpy): build it for real
            expected = expected_weights("cpu")
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:  # unknown arch, bad config
        raise CheckpointError(f"{name} does not match its architecture {arch!r}: {first_line(e)}") from None
    problem = weights_problem(ckpt.get("state_dict"), expected)
    if problem:
        raise CheckpointError(f"{name} does not match its architecture {arch!r}: {problem}")
    for k, v in ckpt["state_dict"].items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{name} has non-finite weights in {k}")


def weights_problem(state_dict: Any, expected: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with `state_dict` as the weights of the network whose state_dict is `expected`, or None."""
    if not isinstance(state_dict, dict):
        return f"state_dict is a {type(state_dict).__name__}, not a dict of tensors"
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing:
        return f"missing weights {', '.join(map(str, missing[:3]))}{' ...' if len(missing) > 3 else ''}"
    if extra:
        return f"unexpected weights {', '.join(map(str, extra[:3]))}{' ...' if len(extra) > 3 else ''}"
    for k, want in expected.items():
        v = state_dict[k]
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_meta:
            return f"{k} is not a dense tensor"
        if v.shape != want.shape:
            return f"{k} has shape {list(v.shape)}, the network's is {list(want.shape)}"
        if v.dtype != want.dtype:
            return f"{k} is {v.dtype}, the network's is {want.dtype}"
    return None


def predictor_from_checkpoint(ckpt: dict[str, Any], task) -> Predictor:
    """Rebuild the trained Predictor of `task` (a t2d.Task) from a loaded checkpoint, in eval mode."""
    validate_checkpoint(ckpt, task)
    model = build_predictor(task, ckpt["arch"], ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# save_checkpoint's temp files, `.<name>.<8 random chars from mkstemp>.tmp`
_TEMP = re.compile(r"\.(last|best)\.pt\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of last.pt and best.pt that a hard kill mid-save left in `folder`.

    Call it only where no save is running: a run's main process, before its first save.
    Returns the files deleted.
    """
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TEMP.fullmatch(p.name) and p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


