"""Where and how the run executes: device, precision, seeding, and torchrun's process group."""

import ctypes
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.config import ConfigError


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, resolved
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16/fp16 autocast on CUDA (bf16 also on CPU, when asked for); nothing on the fp32 path."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)


def setup(device: str, precision: str, regression: bool = False, threads: int = 0) -> Runtime:
    """Join torchrun's process group when launched by torchrun; pick device, precision and CPU threads."""
    if threads:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    # Checked before joining the group, so that a bad value leaves no group behind.
    prec = pick_precision(precision, dev, regression)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # collectives and NCCL's own buffers go to this process's GPU, not cuda:0
    if world_size > 1 and not dist.is_initialized():
        # nccl for GPUs, gloo for CPU: PyTorch's own engines.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    if dev.type == "cuda":
        # TF32 tensor cores for the fp32 matmuls and convolutions that autocast leaves in fp32, but not
        # for a regression: TF32 rounds matmul inputs to 10 bits, as coarse as fp16, and regressions are
        # judged on ~1% relative error (the reason `auto` keeps them out of bf16 too).
        torch.backends.cuda.matmul.allow_tf32 = not regression
        torch.backends.cudnn.allow_tf32 = not regression
        torch.backends.cudnn.benchmark = True
    if dev.type == "cpu":
        keep_freed_memory()
    return Runtime(dev, prec, rank, world_size, local_rank)


def keep_freed_memory() -> None:
    """Stop glibc from handing freed activation buffers back to the OS after every step.

    By default each CPU training step of the CNN page-faults its ~10 MB activations in afresh
    (6,000-13,000 faults and 15-30 ms of kernel time per batch of 128, measured); serving blocks up
    to 32 MiB from the heap and keeping up to 1 GiB of it cut a CNN step from 55-65 to 41-46 ms and
    a whole epoch by 10-20%, for 3-5% more peak memory. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: mmap (and unmap on free) only blocks above 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap instead of trimming it
    except (OSError, AttributeError):
        pass


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device is cuda but no CUDA device is available; use --device cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("run.device is mps but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def pick_precision(name: str, device: torch.device, regression: bool = False) -> str:
    if name == "auto":
        # bf16 keeps about 3 significant digits: too coarse for a regression judged on ~1% relative
        # error, and a 2-16-8-1 MLP gains no speed from it. Classifiers get bf16 where supported.
        if regression or device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if name in ("bf16", "fp16") and device.type != "cuda":
        if name == "bf16" and device.type == "cpu" and not regression:
            # Asked for by name only (auto stays fp32 on CPU): bf16 autocast on a CPU with native bf16
            # instructions cut a CNN training step by ~1/3 (AVX512-BF16, measured); elsewhere oneDNN
            # would emulate it, slower than fp32.
            if cpu_bf16_supported():
                return name
            raise ConfigError("run.precision bf16 on CPU needs native bf16 instructions (AVX512-BF16 or AMX), "
                              "which this CPU lacks; use fp32")
        raise ConfigError(f"run.precision {name} needs CUDA; the {device.type} path trains in fp32")
    return name


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, for all ranks (so every process stops at the same epoch)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
