"""Register parity-checked artifacts in BentoML's local model store ($BENTOML_HOME/models).

The entry is named after the task (`product`, `fashion-mnist`, `mnist`); BentoML gives it a
version, so `<task>:latest` is always the newest export. Its folder holds the artifacts plus
`contract.json` and the run's training plots (loss.png; confusion.png or predicted_vs_true.png) when
it drew them; its metadata holds the contract, normalization statistics, parameter count, training
(validation) and test metrics, train_seconds, the parity summary, the source checkpoint's SHA-256
and the package versions.

A quantized variant (`python -m export --quantize int8`) is its own version of the same entry, with
label and metadata `variant: int8` (float exports: `fp32`), `"variant": "int8"` in contract.json, and
its graph under the same name, model.onnx, so whatever loads the float model loads it unchanged.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

CONTRACT_FILE = "contract.json"
ONNX_FILE = "model.onnx"  # the ONNX graph's name in every entry, whatever the variant's file was called


def register(task: str, files: dict[str, Path], contract: dict[str, Any], metadata: dict[str, Any],
             extra: list[Path] = ()) -> str:
    """Copy `files` (format -> path) and `extra` (the training plots) into a new model-store entry; returns its
    tag, e.g. 'product:abc123'."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage analytics calls from an offline tool
    import bentoml  # slow to import; only needed once parity has passed

    metadata = _without_none(metadata)  # BentoML's metadata refuses None; contract.json keeps the nulls
    variant = contract.get("variant", "fp32")
    labels = {"task": task, "kind": contract["kind"], "formats": ",".join(sorted(files)), "variant": variant}
    metadata.setdefault("variant", variant)
    with bentoml.models.create(name=task, labels=labels, metadata=metadata) as model:
        for key, path in files.items():
            shutil.copy2(path, model.path_of(ONNX_FILE if key == "onnx" else path.name))
        for path in extra:
            shutil.copy2(path, model.path_of(path.name))
        Path(model.path_of(CONTRACT_FILE)).write_text(json.dumps(contract, indent=2) + "\n")
    return str(model.tag)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value
