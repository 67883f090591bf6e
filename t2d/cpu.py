"""What CPU this is: its model name and the instruction-set flags that change speed and int8 answers.

Speed ratios and int8 results depend on the CPU kind (an AVX2-only machine, one with AVX-512 VNNI, one
with AMX), so every figure the toolkit records names the CPU it was measured on: train's summary.json,
export's quantization.json, and the server's log when it checks an int8 variant. Torch-free: the
server imports it.
"""

import functools
import platform

# The flags that matter here: wide vectors, bf16 arithmetic, and the int8 dot-product instructions
# (VNNI, AMX) whose absence makes onnxruntime's u8s8 kernels saturate.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model": the CPU's model name, "flags": the FLAGS it has, "vnni": whether it has an int8 dot product}."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break  # every core lists the same flags; "model name" comes before them
    except OSError:  # not Linux: the flags are unknown, not absent
        pass
    have = [f for f in FLAGS if f in flags]
    return {"model": model, "flags": have, "vnni": any(f in flags for f in VNNI_FLAGS)}


def describe(info: dict | None = None) -> str:
    """One line for logs and reports: 'AMD EPYC 7B13 (avx2, no avx512f, no VNNI)'."""
    info = info or cpu_info()
    flags = ", ".join(info["flags"]) or "no flags read"
    return f"{info['model']} ({flags}; {'VNNI' if info['vnni'] else 'no VNNI'})"
