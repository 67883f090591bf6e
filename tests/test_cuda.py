"""The GPU path, run for real (issue 18): every test here needs a CUDA GPU and is skipped without one.

    python -m pytest -m cuda -rs                      # on a GPU machine; bench/gpu.sh runs these and the GPU benchmarks

What is checked on the GPU: bf16 and fp16 autocast train every built-in image task to its quality on
the tiny IDX set (tests/conftest.py), product reaches its target in full fp32 (TF32 off for regressions); fp16's GradScaler
state survives --resume bit for bit; a CUDA-trained checkpoint loads and exports on a CPU-only
process with parity; torchrun with one process, and a one-process nccl group with DDP and
SyncBatchNorm, end where a plain process ends; the data stays on the GPU (no host-to-device copy
per batch, counted with torch's profiler).

Runs that must be bit-reproducible (resume, torchrun, nccl) go through `deterministic_main` in a fresh
process: `train.runtime.setup` turns cuDNN's autotuner on (its choice of algorithm can differ from
one process to the next), so the harness turns it off after setup and asks for deterministic
algorithms, with cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import PRODUCT, assert_same_weights, history, state, train
from test_train import image_args as train_image_args

import t2d
from models.checkpoint import load_checkpoint, predictor_from_checkpoint
from train.config import build_config
from train.data import batch_order, load_task_data
from train.engine import evaluate
from train.main import parse_args, run
from train.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); bench/gpu.sh runs these on one"),
]

# In-process GPU runs: no TensorBoard or PNGs (as conftest's FAST, but on the GPU).
CUDA = ["--device", "cuda", "--log.tensorboard", "false", "--log.plots", "false"]
TIMEOUT = 240  # s per subprocess: a hung collective fails its test, not the whole GPU session
FORCE_NCCL = "T2D_TEST_NCCL_GROUP"  # deterministic_main: train in a one-process nccl group (DDP, SyncBatchNorm)
SEEN_DDP = re.compile(r"harness: DistributedDataParallel over (\d+) SyncBatchNorm layers")


def image_args(data_dir: Path, task: str = "fashion-mnist", arch: str = "cnn") -> list[str]:
    """tests/test_train.py's tiny image runs, the CNN on Fashion-MNIST unless told otherwise."""
    return train_image_args(data_dir, task, arch)


def gpu_train(argv: list[str], out: Path) -> dict:
    """`python -m train --device cuda ARGV` in this process; the summary."""
    cfg, resume = parse_args([*CUDA, "--out", str(out), *argv])
    return run(cfg, resume)


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def det_cli(args: list[str], cwd: Path, *, torchrun: bool = False, nccl: bool = False) -> subprocess.CompletedProcess:
    """`python -m train --device cuda ARGS` through `deterministic_main` in a fresh process (under
    `torchrun --standalone --nproc_per_node=1` when asked; in a one-process nccl group with `nccl`)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(Path(__file__)), *CUDA, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env(**{FORCE_NCCL: "1" if nccl else "0"}))


def export_on_cpu(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m export ARGS` in a process that sees no GPU (CUDA_VISIBLE_DEVICES empty)."""
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env(CUDA_VISIBLE_DEVICES=""))


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in records]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def fp32_weights(ckpt: dict) -> bool:
    """Mixed precision keeps the master weights float32: the checkpoint rebuilds a plain fp32 model."""
    return all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())


# --- device, precision, TF32 ----------------------------------------------------------------------

def test_setup_picks_the_gpu_bf16_and_tf32_for_images_full_fp32_for_regression():
    from train.runtime import setup

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        images = setup("auto", "auto")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        regression = setup("auto", "auto", regression=True)  # full fp32: TF32's 10 bits would cost its MRE
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert images.device == regression.device == torch.device("cuda", 0)
        assert (images.precision, regression.precision) == ("bf16", "fp32")  # an H200 has bf16
        layer, x = torch.nn.Linear(8, 4).cuda(), torch.randn(3, 8, device="cuda")
        for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
            with Runtime(images.device, precision).autocast():
                assert layer(x).dtype == dtype, precision
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


# --- every built-in task reaches its quality on the GPU ------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("task, arch", [("mnist", "mlp"), ("mnist", "cnn"), ("fashion-mnist", "mlp"),
                                        ("fashion-mnist", "cnn")])
def test_image_task_learns_in_half_precision(tmp_path, image_dir, task, arch, precision):
    """8 epochs of 5 steps on the tiny set. On CPU (fp32) 4 epochs reach 100% test accuracy (chance: 10%).
    fp16's scaler skips the first steps while its scale falls from 2**16 to what the gradients fit: 8
    epochs leave room for that. A run whose steps never apply (every step inf, a broken scaler or
    autocast) stays near chance and fails."""
    s = gpu_train([*image_args(image_dir, task, arch), "--epochs", "8", "--precision", precision], tmp_path)
    h = history(tmp_path)
    assert (s["precision"], s["device"], s["epochs_run"]) == (precision, "cuda:0", 8)
    assert h[-1]["train_loss"] < 0.3 * h[0]["train_loss"], [r["train_loss"] for r in h]
    assert h[-1]["val_loss"] < 0.3 * h[0]["val_loss"], [r["val_loss"] for r in h]
    assert s["test"]["accuracy"] >= 90, s["test"]
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert fp32_weights(ckpt)
    scaler = ckpt["resume"]["scaler"]
    if precision == "fp16":  # GradScaler's state travels with the checkpoint
        assert scaler is not None and 0 < scaler["scale"] < float("inf"), scaler
    else:
        assert scaler is None  # bf16 needs no loss scaling


def test_product_on_the_gpu_in_fp32_reaches_its_target(tmp_path):
    """configs/product_fast.yaml (the reference 2-16-8-1 network, L-BFGS): on CPU test MRE 1.31% at seed 0,
    1.24% on average over seeds 10-14; the README's target is <= 1.35%. `auto` must keep the regression in full fp32 on CUDA (TF32
    off). Nothing learnt, or a lost normalization, is tens of percent."""
    s = gpu_train(["--config", str(REPO / "configs" / "product_fast.yaml")], tmp_path)
    assert (s["precision"], s["device"]) == ("fp32", "cuda:0")
    assert s["test"]["mre"] <= 1.35, s["test"]


# --- fp16 resume, bit for bit ---------------------------------------------------------------------

def test_fp16_resume_restores_the_grad_scaler_bit_for_bit(tmp_path, image_dir):
    """6 epochs straight against 3 + --resume 3: the same weights, optimizer state, GradScaler state and
    metrics, exactly. Dropout, crops and flips draw from the GPU's generator, so this also needs the
    per-epoch reseeding of torch.cuda. The scaler at the cut is checked to be off its initial state, so
    that a resume that restarted it (scale 2**16, growth tracker 0) ends elsewhere and fails."""
    args = [*image_args(image_dir), "--precision", "fp16", "--model.dropout", "0.3", "--data.crop_padding", "2",
            "--data.hflip", "true", "--log.checkpoint_every_s", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for argv in ([*args, "--epochs", "6", "--out", str(straight)], [*args, "--epochs", "3", "--out", str(resumed)]):
        proc = det_cli(argv, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    cut = load_checkpoint(resumed / "last.pt")["resume"]["scaler"]
    assert cut is not None and (cut["scale"], cut["_growth_tracker"]) != (2.0 ** 16, 0), cut
    proc = det_cli(["--resume", str(resumed / "last.pt"), "--epochs", "6", "--out", str(resumed)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(resumed)["precision"] == "fp16"
    a, b = (load_checkpoint(d / "last.pt") for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 6
    assert a["resume"]["scaler"] == b["resume"]["scaler"]
    assert_same_weights(a["state_dict"], b["state_dict"])
    assert_same_weights(state(straight / "best.pt"), state(resumed / "best.pt"))
    assert a["resume"]["optimizer"]["state"].keys() == b["resume"]["optimizer"]["state"].keys()
    for k, t in a["resume"]["optimizer"]["state"].items():
        assert_same_weights(t, b["resume"]["optimizer"]["state"][k])
    assert without_timing(history(straight)) == without_timing(history(resumed))
    assert without_timing([summary(straight)]) == without_timing([summary(resumed)])


# --- a GPU checkpoint on a CPU-only machine: load, export with parity, resume ---------------------

def tensors(obj):
    """Every tensor in a checkpoint's nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


@pytest.mark.parametrize("case", ["product", "fashion-mnist-cnn"])
def test_gpu_checkpoint_exports_with_parity_on_a_cpu_only_process(tmp_path, image_dir, case):
    """Trained on the GPU (product fp32, the CNN in bf16), then `python -m export` in a process that sees
    no GPU: every artifact matches the CPU eager model in raw units (atol 1e-5, rtol 1e-5, the export
    defaults). The CPU eager model rebuilt from the file scores what the GPU run reported (up to the kernels'
    summation order, and bf16 rounding for the CNN), and the checkpoint resumes on the CPU."""
    out = tmp_path / "run"
    if case == "product":
        args = [*PRODUCT, "--epochs", "30", "--optim.lr", "0.01"]
        export_args: list[str] = []
    else:
        args = [*image_args(image_dir), "--epochs", "4"]
        export_args = ["--data-dir", str(image_dir)]
    s = gpu_train(args, out)
    assert s["device"] == "cuda:0" and s["precision"] == ("fp32" if case == "product" else "bf16")
    # Every tensor in the files, the optimizer's state included, is a CPU tensor: they load without
    # map_location on a machine with no GPU.
    for name in ("best.pt", "last.pt"):
        raw = torch.load(out / name, weights_only=True)
        devices = {t.device.type for t in tensors(raw)}
        assert devices == {"cpu"} and any(t.numel() > 1 for t in tensors(raw["resume"]["optimizer"])), devices

    proc = export_on_cpu(["--checkpoint", str(out / "best.pt"), "--out", str(out / "export"), "--no-register",
                          *export_args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "export" / "parity.json").read_text())
    assert report["passed"] and (report["atol"], report["rtol"]) == (1e-5, 1e-5)
    assert set(report["worst"]) == {"onnx", "torchscript"}
    assert all(c["passed"] for c in report["checks"]) and len(report["checks"]) == 2 * len(report["batch_sizes"])
    if case != "product":
        assert report["inputs"].startswith("first "), report["inputs"]  # the test images, not random inputs

    # The CPU eager model from the file alone against the GPU run's own test metrics.
    ckpt = load_checkpoint(out / "best.pt")  # map_location cpu
    task = t2d.builtin_tasks()[ckpt["task"]]
    model = predictor_from_checkpoint(ckpt, task)
    cfg = build_config(ckpt["task"], [ckpt["config"], {"run": {"device": "cpu"}}])
    data = load_task_data(cfg, torch.device("cpu"))
    test = evaluate(model, data.test_x, data.test_y, task.regression, 2048, Runtime(torch.device("cpu"), "fp32"),
                    len(data.classes or []))
    if case == "product":
        # GPU and CPU kernels sum in other orders (no TF32 for a regression). A lost normalization is 100%.
        assert abs(test["mre"] - s["test"]["mre"]) <= max(0.2, 0.25 * s["test"]["mre"]), (test["mre"], s["test"])
    else:
        assert abs(test["accuracy"] - s["test"]["accuracy"]) <= 3, (test["accuracy"], s["test"]["accuracy"])

    # ... and it resumes on the CPU (its optimizer state moves off the GPU).
    epochs = ckpt["config"]["run"]["epochs"]
    shutil.copytree(out, tmp_path / "cpu")
    resumed = train(["--resume", str(tmp_path / "cpu" / "last.pt"), "--epochs", str(epochs + 1)], tmp_path / "cpu")
    assert (resumed["device"], resumed["epochs_run"]) == ("cpu", epochs + 1)


# --- torchrun and nccl --------------------------------------------------------------------------

# The CNN (BatchNorm) in bf16 with dropout and selective training: the selection's per-example losses,
# the training loss and the metrics all go through all_reduce_sum, the stop decision through a broadcast.
DIST_ARGS = ["--model.dropout", "0.2", "--data.skip_easiest", "0.4", "--epochs", "3", "--log.checkpoint_every_s", "0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, image_dir) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    proc = det_cli([*image_args(image_dir), *DIST_ARGS, "--out", str(out)], out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_weights(state(a / "last.pt"), state(b / "last.pt"))
    assert_same_weights(state(a / "best.pt"), state(b / "best.pt"))
    assert without_timing(history(a)) == without_timing(history(b))
    sa, sb = summary(a), summary(b)
    assert (sa["val"], sa["test"]) == (sb["val"], sb["test"])


def test_torchrun_with_one_process_equals_one_process(one_process, image_dir, tmp_path):
    """torchrun sets LOCAL_RANK/WORLD_SIZE: the job must pick cuda:0 and train exactly as a plain process.
    (With one process there is no process group: the next test covers nccl.)"""
    out = tmp_path / "run"
    proc = det_cli([*image_args(image_dir), *DIST_ARGS, "--out", str(out)], tmp_path, torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device: cuda:0 precision: bf16 processes: 1" in proc.stdout
    assert_same_run(one_process, out)


@pytest.mark.skipif(not dist.is_nccl_available(), reason="this torch build has no nccl")
def test_nccl_group_with_ddp_and_sync_batchnorm_equals_one_process(one_process, image_dir, tmp_path):
    """The multi-GPU code path on the one GPU there is: a one-process nccl group (device_id set), the CNN
    converted to SyncBatchNorm and wrapped in DistributedDataParallel, every reduction and broadcast
    through nccl (a CPU tensor in a collective is an error there, unlike gloo). With one process DDP's
    average and SyncBatchNorm's statistics are the plain ones, so the run ends with the same weights,
    bit for bit. (SyncBatchNorm's cross-GPU statistics need two GPUs: not checked here.)"""
    out = tmp_path / "run"
    proc = det_cli([*image_args(image_dir), *DIST_ARGS, "--out", str(out)], tmp_path, nccl=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = SEEN_DDP.search(proc.stdout)
    assert seen and int(seen[1]) > 0, proc.stdout[-3000:]  # DDP wrapped the network, with SyncBatchNorm in it
    ckpt = load_checkpoint(out / "best.pt")
    assert not any(k.startswith("module.") or ".module." in k for k in ckpt["state_dict"])  # loads into plain BatchNorm
    assert_same_run(one_process, out)


# --- the data lives on the GPU --------------------------------------------------------------------

@pytest.mark.parametrize("task", ["product", "fashion-mnist"])
def test_task_data_and_batches_are_on_the_gpu(image_dir, task):
    data = {"dir": str(image_dir), "download": False, "val_size": 50} if task != "product" else {"size": 300}
    cfg = build_config(task, [{"data": data}])
    d = load_task_data(cfg, torch.device("cuda"))
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        value = getattr(d, name)
        assert all(t.is_cuda for t in (value.tensors if name.endswith("_x") else [value])), name
    assert all(b.is_cuda for b in batch_order(len(d.train_x), 50, 1, 0, device=torch.device("cuda")))


def host_to_device_copies(argv: list[str], out: Path) -> int:
    """Host-to-device memcpys that CUDA ran during a whole GPU training run (torch's profiler, CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    torch.ones(1, device="cuda").sum().item()  # the context and CUPTI exist before the profiled run
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gpu_train(argv, out)
        torch.cuda.synchronize()
    return sum("Memcpy HtoD" in e.name for e in prof.events())


@pytest.mark.parametrize("case", ["product-fp32", "images-bf16", "images-fp16-augment-select"])
def test_no_host_to_device_copy_per_batch(tmp_path, image_dir, case):
    """The same 2-epoch run with 5 and with 25 batches an epoch copies from the host as often: loading the
    data, the model and each epoch's batch order, never a batch. A loader that moved each batch to the
    GPU adds 40 copies. The loading copies (6 data tensors at least) show that the profiler sees them."""
    if case == "product-fp32":
        args = ["--task", "product", "--data.size", "250", "--data.val_size", "50", "--data.test_size", "100"]
    else:
        args = [*image_args(image_dir), "--precision", "bf16" if case == "images-bf16" else "fp16"]
        if case.endswith("select"):
            args += ["--data.crop_padding", "2", "--data.hflip", "true", "--data.skip_easiest", "0.4"]
    args += ["--epochs", "2", "--log.checkpoint_every_s", "0"]
    copies = {batch: host_to_device_copies([*args, "--data.batch_size", str(batch)], tmp_path / f"b{batch}")
              for batch in (50, 10)}
    assert copies[50] >= 6, f"the profiler saw {copies[50]} host-to-device copies; loading alone makes 6"
    assert copies[10] == copies[50], f"{copies[50]} copies at 5 batches an epoch, {copies[10]} at 25"


# --- the harness: `python tests/test_cuda.py ARGS` ------------------------------------------------

def deterministic_main(argv: list[str]) -> int:
    """`python -m train ARGS` with cuDNN's autotuner off and deterministic algorithms on; with
    T2D_TEST_NCCL_GROUP=1, in a one-process nccl group that fit() treats as distributed."""
    import train.fit
    import train.main

    real_setup, real_ddp = train.main.setup, train.fit.DistributedDataParallel

    class OneProcessGroup(Runtime):
        @property
        def distributed(self) -> bool:  # fit() wraps DDP and SyncBatchNorm, the collectives go through nccl
            return True

    def setup(*args, **kwargs) -> Runtime:
        rt = real_setup(*args, **kwargs)
        torch.backends.cudnn.benchmark = False  # setup turns it on: its pick can differ between processes
        torch.backends.cudnn.deterministic = True
        # warn_only: max_pool2d's CUDA backward has no deterministic flag, but its 2x2 windows don't overlap
        torch.use_deterministic_algorithms(True, warn_only=True)
        if os.environ.get(FORCE_NCCL) == "1":
            cuda = rt.device.type == "cuda"  # gloo on CPU: only to try the harness where there is no GPU
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=rt.device if cuda else None)
            rt = OneProcessGroup(rt.device, rt.precision)
        return rt

    def ddp(module, **kwargs):
        layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
        print(f"harness: DistributedDataParallel over {layers} SyncBatchNorm layers, "
              f"backend {dist.get_backend()}", flush=True)
        return real_ddp(module, **kwargs)

    train.main.setup, train.fit.DistributedDataParallel = setup, ddp
    return train.main.main(argv)


if __name__ == "__main__":
    sys.exit(deterministic_main(sys.argv[1:]))
