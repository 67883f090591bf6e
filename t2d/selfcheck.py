"""A quantized variant's self-check: held-out inputs, the float model's answers, and how well the variant
agreed with them where it was exported; the server runs the variant on them again, on its own CPU.

int8 kernels differ between CPUs (with and without VNNI, an int8 dot product), so a variant gated on
one machine can answer differently on another. `python -m export --quantize` writes `selfcheck.npz`
into the variant's store entry; `serve.store` checks it when it opens the variant and refuses to
serve a variant that agrees less than `min_agreement` with the float model here.

The file is plain arrays (read with allow_pickle=False, so it cannot carry code):
    meta            JSON: kind, rows, agreement, min_agreement, scored output, requires_vnni
    input:<name>    each input's rows, as the graph takes them
    float:<name>    the float32 model's answer for the scored output

Torch-free: the server imports it.
"""

import io
import json
from typing import Any

import numpy as np

FILE = "selfcheck.npz"
AGREE_REL = 0.01  # regression: an answer agrees when |variant - float| <= 1% of |float|
MAX_ROWS = 256
MAX_INPUT_BYTES = 1 << 20  # inputs kept in the store entry: 256 small rows, or fewer large images
SLACK = 0.01  # agreement this far below the export's, or one row, is noise between CPUs; more is not


class SelfCheckError(Exception):
    """The variant disagrees with its float model on this CPU; the message is one line with the numbers."""


def agreement(kind: str, reference: np.ndarray, got: np.ndarray) -> float:
    """The fraction of rows (classification: argmax) or values (regression: within 1%) where `got` agrees
    with the float model's `reference`."""
    if kind == "classification":
        return float((reference.argmax(1) == got.argmax(1)).mean())
    ref, got = reference.astype(np.float64), got.astype(np.float64)
    return float((np.abs(got - ref) <= AGREE_REL * np.abs(ref)).mean())


def sample_rows(feeds: dict[str, np.ndarray]) -> int:
    """How many leading rows of `feeds` to keep: at most MAX_ROWS and MAX_INPUT_BYTES of inputs."""
    n = len(next(iter(feeds.values())))
    row_bytes = sum(v[:1].nbytes for v in feeds.values())
    return max(1, min(n, MAX_ROWS, MAX_INPUT_BYTES // max(row_bytes, 1)))


def build(kind: str, feeds: dict[str, np.ndarray], output: str, reference: np.ndarray, got: np.ndarray,
          requires_vnni: bool) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and its meta, for the rows in `feeds` (the float model's `reference` answers and the
    variant's `got` on them, measured here as one batch, as the server will run them)."""
    rows = len(reference)
    measured = agreement(kind, reference, got)
    meta = {"kind": kind, "rows": rows, "output": output, "agreement": measured,
            "min_agreement": max(0.0, measured - max(SLACK, 1 / rows)), "requires_vnni": requires_vnni}
    arrays = {f"input:{k}": v for k, v in feeds.items()} | {f"float:{output}": reference,
                                                              "meta": np.array(json.dumps(meta))}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue(), meta


def read(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """(meta, feeds, the float model's answers) from the file's bytes; ValueError if malformed."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    feeds = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("input:")}
    reference = arrays.get(f"float:{meta.get('output')}")
    if not feeds or reference is None or not isinstance(meta.get("min_agreement"), (int, float)):
        raise ValueError(f"{FILE} lacks its inputs, the float answers or min_agreement")
    return meta, feeds, reference


def check(meta: dict[str, Any], reference: np.ndarray, got: np.ndarray, cpu: dict[str, Any]) -> float:
    """This CPU's agreement; SelfCheckError when it is below the stored minimum, or when the variant needs an
    int8 dot product (VNNI) this CPU lacks."""
    from t2d.cpu import describe

    if meta.get("requires_vnni") and not cpu["vnni"]:
        raise SelfCheckError(f"the variant was quantized for CPUs with VNNI and this CPU has none: "
                             f"{describe(cpu)}")
    here = agreement(meta["kind"], reference, got)
    if here < meta["min_agreement"]:
        raise SelfCheckError(f"it agrees with the float model on {here:.1%} of {meta['rows']} stored rows here, "
                             f"{meta['agreement']:.1%} where it was exported (at least {meta['min_agreement']:.1%} "
                             f"needed), on {describe(cpu)}")
    return here
