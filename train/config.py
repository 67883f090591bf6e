"""Run configuration: one dataclass per concern, defaults in code, an optional YAML file, CLI overrides.

Precedence, lowest first: code defaults -> the task's defaults (`Task.defaults`) -> the checkpoint's config
when resuming -> `--config FILE.yaml` -> `--section.field value` flags. Unknown keys and values of
the wrong type raise ConfigError with a one-line message.
"""

import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import t2d

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lbfgs")
SCHEDULERS = ("none", "step", "cosine", "plateau", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST = ("auto", "on", "off")
MAX_SEED = 2**63 - 1  # any seed torch's generators take, with room for seed + epoch
MAX_POINTS = 10**8  # product data sizes
MAX_THREADS = 1024  # torch.set_num_threads takes a C int; more threads than this is a typo


class ConfigError(ValueError):
    """A config the user got wrong; the message is one line that says what to change."""


@dataclass
class RunConfig:
    task: str = "product"
    """A built-in task (product | mnist | fashion-mnist) or module:ATTRIBUTE naming a user's t2d.Task."""
    out: str = ""
    """Run folder for checkpoints and logs; empty means `runs/<task name>`."""
    epochs: int = 10
    """Maximum number of epochs (the run may stop earlier, see `stop`)."""
    seed: int = 0
    """Seeds data generation, splits, initialization and shuffling; 0 to 2**63 - 1."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu) | cpu | cuda | mps."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA where supported for images; fp32 for product and off CUDA) | fp32 |
    bf16 (CUDA; also CPU for images, where the CPU has native bf16: AVX512-BF16 or AMX) | fp16 (CUDA,
    with GradScaler)."""
    folds: int = 1
    """k-fold cross-validation when > 1: trains `folds` models on the training data and reports mean and std."""
    max_seconds: float = 0.0
    """A training-time budget in seconds (0 = none): a few steps are timed first, and run.epochs becomes the most
    epochs, at most its own value, estimated to fit, timing included (train/budget.py). The schedule is planned for
    that many epochs, so it anneals inside the budget; config.yaml records the number, and --epochs with it repeats
    the run. An estimate: a host that slows down mid-run overshoots it, so leave a margin."""
    max_batches: int = 0
    """Stop each epoch after this many batches; 0 = the whole epoch (smoke tests and dry runs)."""
    test: bool = True
    """Score best.pt on the test set at the end. false while choosing settings: no model then sees the
    test split, so no choice can lean on it (summary.json's test is null, and no test plots)."""
    threads: int = 0
    """CPU threads for torch's operators, at most 1024; 0 = torch's default (one per core). 1 suits tiny models like
    the product MLP, which gain nothing from a second thread and, on a busy machine, lose much
    waiting for it: a 0.5 s run took 6-18 s with 2 threads on 2 shared cores (measured)."""

    channels_last: str = "auto"
    """auto | on | off: image models train with their weights and batches in torch's channels_last (NHWC)
    layout, oneDNN's fast path. auto = on for image tasks on CPU, where it measured faster
    (bench/train_step.py; BENCHMARKS.md has the figures), and off on CUDA and MPS, where it was not
    measured. Checkpoints and exports are the same either way."""
    compile: bool = False
    """Train through torch.compile. Off by default: its first step compiles for a long while, and on the
    CPUs measured (bench/train_step.py, BENCHMARKS.md) a compiled CNN step was slower than an eager one in
    channels_last; try it for long runs on a GPU. Only the training steps are compiled: validation,
    checkpoints and the export use the eager module, unchanged."""

    def check(self):
        _choice("run.device", self.device, DEVICES)
        _choice("run.channels_last", self.channels_last, CHANNELS_LAST)
        _choice("run.precision", self.precision, PRECISIONS)
        _at_least("run.epochs", self.epochs, 1)
        _at_least("run.folds", self.folds, 1)
        _at_least("run.max_batches", self.max_batches, 0)
        _at_least("run.max_seconds", self.max_seconds, 0.0)
        if self.max_seconds and self.folds > 1:
            raise ConfigError("run.max_seconds plans one model's epochs, not k folds'; set run.epochs for --folds")
        if self.max_seconds and self.compile:
            raise ConfigError("run.max_seconds times eager steps, and torch.compile's warm-up would not fit its plan; "
                              "use one of them")
        _between("run.threads", self.threads, 0, MAX_THREADS)
        _between("run.seed", self.seed, 0, MAX_SEED)
        out = Path(self.out)  # the nearest existing part must be a folder, or mkdir fails after loading the data
        nearest = next(f for f in (out, *out.parents) if f.exists())
        if not nearest.is_dir():
            raise ConfigError(f"run.out {self.out} cannot be a run folder: {nearest} is a file")


@dataclass
class DataConfig:
    dir: str = ""
    """The task's data folder (t2d.DataOptions.dir). Built-in image tasks: MNIST / Fashion-MNIST IDX files
    (or torchvision's layout); empty means `data/<task>` and, for Fashion-MNIST, also Debian's
    /usr/share/datasets/fashion-mnist."""
    download: bool = True
    """Built-in image tasks: try torchvision's download when the IDX files are missing."""
    size: int = 1000
    """Synthetic tasks (product): training points (the reference uses 1000)."""
    val_size: int = 200
    """Validation samples: fresh points (product), or held out of the training split when the task gives
    no validation split."""
    test_size: int = 10000
    """Synthetic tasks (product): fresh test points, drawn with `test_seed` as the reference script does."""
    test_seed: int = 123
    """Synthetic tasks (product): seed of the test set (123 is the reference's); 0 to 2**63 - 1."""
    batch_size: int = 100
    """Global batch size (split evenly across processes under torchrun)."""
    eval_batch_size: int = 2048
    """Batch size for validation and test passes."""
    crop_padding: int = 0
    """Images: random-crop augmentation with this much zero padding (0 = off; 2 is typical; below the image's side)."""
    hflip: bool = False
    """Images: random horizontal flips (sensible for Fashion-MNIST, not for digits)."""
    group_by_length: bool = False
    """Tasks whose inputs vary in size: batches of samples of similar size (each run of 50 shuffled batches sorted
    by size, then the batches shuffled), so that less of each batch is padding; the order still changes every
    epoch."""
    skip_easiest: float = 0.0
    """After the first epoch, skip this fraction of the training set in each epoch: the examples whose
    loss was lowest when last trained on (train/select.py). 0 = every epoch trains on every example."""

    def check(self):
        # product points are generated in memory: 10^8 of them are ~1.2 GB with their copies; more is a typo
        _between("data.size", self.size, 2, MAX_POINTS)
        _between("data.val_size", self.val_size, 1, MAX_POINTS)
        _between("data.test_size", self.test_size, 1, MAX_POINTS)
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.eval_batch_size", self.eval_batch_size, 1)
        _between("data.test_seed", self.test_seed, 0, MAX_SEED)
        _at_least("data.crop_padding", self.crop_padding, 0)
        if not 0.0 <= self.skip_easiest < 1.0:
            raise ConfigError(f"data.skip_easiest must be in [0, 1), got {self.skip_easiest}")


@dataclass
class OptimConfig:
    name: str = "adam"
    """sgd | adam | adamw | rmsprop | adagrad | lbfgs (full-batch quasi-Newton: one batch of the whole
    training set, `data.batch_size` = `data.size`, and `lr` 1; one process, no clipping or weight decay)."""
    lr: float = 1e-3
    """Learning rate (the peak rate for onecycle; lbfgs: the scale of its line search's first trial step)."""
    weight_decay: float = 0.0
    decay_norms_and_biases: bool = True
    """false: weight decay only on the weight matrices and kernels (parameters of two or more dimensions), none on
    biases and normalization scales and shifts, which set no model's capacity (timm's and many recipes' choice)."""
    momentum: float = 0.9
    """sgd and rmsprop only; in [0, 1)."""
    nesterov: bool = False
    """sgd only; needs momentum > 0."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 = no clipping."""
    label_smoothing: float = 0.0
    """Images: cross-entropy against targets with this share of the mass spread over all classes
    (0 = one-hot; 0.1 is typical). Training loss only; validation and test report the plain one."""
    max_iter: int = 20
    """lbfgs only: iterations per optimizer step, i.e. per batch (each evaluates the loss about 1.2 times)."""
    history_size: int = 20
    """lbfgs only: past updates kept for its curvature estimate (more: better steps, slower iterations)."""
    ema: float = 0.0
    """Keep an exponential moving average of the weights, updated after every step with this decay (0 = off;
    0.999 averages over about the last 1000 steps): validation, best.pt and last.pt, the test and the export use the
    average, and the checkpoint also keeps the trained weights, so --resume continues both."""

    def check(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        _positive("optim.lr", self.lr)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        _at_least("optim.clip_grad_norm", self.clip_grad_norm, 0.0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _at_least("optim.max_iter", self.max_iter, 1)
        _at_least("optim.history_size", self.history_size, 1)
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"optim.ema must be in [0, 1) (a decay per step; 0 = off), got {self.ema}")
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov needs optim.momentum > 0 (torch's SGD refuses it); set one of them")
        if self.name == "lbfgs":
            # torch's LBFGS has no weight decay, and clipping would change the gradients its line search trusts.
            for key in ("weight_decay", "clip_grad_norm"):
                if getattr(self, key):
                    raise ConfigError(f"optim.{key} does not apply to optim.name lbfgs; set it to 0")


@dataclass
class SchedConfig:
    name: str = "none"
    """none | step | cosine | plateau | onecycle."""
    step_size: int = 10
    """step: epochs between decays."""
    gamma: float = 0.1
    """step: factor applied every `step_size` epochs (> 0; below 1 decays)."""
    min_lr: float = 0.0
    """cosine: final rate; plateau: floor; at most `optim.lr`."""
    factor: float = 0.1
    """plateau: decay factor, in (0, 1)."""
    patience: int = 5
    """plateau: epochs without improvement before decaying."""
    pct_start: float = 0.3
    """onecycle: fraction of steps spent warming up."""

    def check(self):
        _choice("sched.name", self.name, SCHEDULERS)
        _at_least("sched.step_size", self.step_size, 1)
        _positive("sched.gamma", self.gamma)  # above 1 grows the rate: allowed (tests blow a run up that way)
        if not 0.0 < self.factor < 1.0:
            raise ConfigError(f"sched.factor must be in (0, 1) (a decay factor), got {self.factor}")
        _at_least("sched.min_lr", self.min_lr, 0.0)
        _at_least("sched.patience", self.patience, 0)
        if not 0.0 < self.pct_start < 1.0:
            raise ConfigError(f"sched.pct_start must be in (0, 1), got {self.pct_start}")


@dataclass
class StopConfig:
    monitor: str = "loss"
    """Validation metric for best.pt, early stopping and plateau: loss, mse, mae, mre (product), accuracy (images)."""
    patience: int = 0
    """Stop after this many epochs without improvement; 0 = no early stopping."""
    min_delta: float = 0.0
    """Smallest change of the monitored metric that counts as an improvement."""
    target: float = 0.0
    """Stop once the validation loss is at or below this; 0 = off."""
    keep: str = "best"
    """Which epoch best.pt holds and the test evaluates: best (by monitor) | last. `last` suits a fixed
    schedule (one-cycle, cosine) whose annealed end is the model: picking by a small validation set
    can pick an earlier epoch on noise. The monitor still drives early stopping and plateau."""

    def check(self):
        _choice("stop.keep", self.keep, ("best", "last"))
        _at_least("stop.patience", self.patience, 0)
        _at_least("stop.min_delta", self.min_delta, 0.0)
        _at_least("stop.target", self.target, 0.0)


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to `<out>/tensorboard`."""
    histograms: int = 20
    """Weight histograms per run in TensorBoard, spread evenly over the epochs (and the first); 0 = none.
    A count, not an interval: each costs ~0.5 ms a parameter, which adds up over 1000 short epochs."""
    plots: bool = True
    """Write PNG plots (loss curves; predicted vs true or confusion matrix) at the end."""
    progress: bool = True
    """Progress bar over batches when the console is a terminal."""
    print_every: int = 1
    """Epochs between console summary lines (the first and last epoch always print)."""
    checkpoint_every_s: float = 5.0
    """Write last.pt and best.pt at most this often (seconds), and always at the end, also after an error
    or Ctrl-C; epochs in between wait in memory. 0 = after every epoch (each write costs 3-10 ms)."""

    def check(self):
        _at_least("log.histograms", self.histograms, 0)
        _at_least("log.print_every", self.print_every, 1)
        _at_least("log.checkpoint_every_s", self.checkpoint_every_s, 0.0)


SECTIONS = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "sched": SchedConfig,
            "stop": StopConfig, "log": LogConfig}


def resolve_task(ref: str) -> t2d.Task:
    """The Task of `run.task`, as a ConfigError when it cannot be had. Not cached here: Python imports a
    user's module once (sys.modules), and a module reloaded or re-imported gives its new Task."""
    try:
        return t2d.resolve(ref)
    except t2d.TaskError as e:
        raise ConfigError(str(e)) from None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "product_mlp"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def task(self) -> t2d.Task:
        return resolve_task(self.run.task)

    @property
    def arch(self) -> str:
        return self.model["arch"]

    @property
    def model_fields(self) -> dict[str, Any]:
        """The architecture's config fields, without `arch` itself."""
        return {k: v for k, v in self.model.items() if k != "arch"}

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out or f"runs/{self.task.name}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> "Config":
        for name in SECTIONS:
            getattr(self, name).check()
        task = self.task
        _choice("stop.monitor", self.stop.monitor, task.monitors)
        if self.arch not in task.models:
            raise ConfigError(f"model.arch {self.arch!r} is not a model of task {task.name}; "
                              f"choose one of {', '.join(task.models)}")
        if self.data.crop_padding or self.data.hflip:
            if not task.image_input:
                raise ConfigError(f"data.crop_padding and data.hflip augment images; task {task.name}'s inputs "
                                  f"{[f'{i.name} {list(i.shape)}' for i in task.inputs]} are not one image: set "
                                  f"them to 0 and false")
            # A shift of the image's side or more can move the whole image out of its crop.
            _between("data.crop_padding", self.data.crop_padding, 0, min(task.input.shape[1:]) - 1)
        if self.sched.name in ("cosine", "plateau") and self.sched.min_lr > self.optim.lr:
            raise ConfigError(f"sched.min_lr {self.sched.min_lr} is above optim.lr {self.optim.lr}; "
                              f"sched.name {self.sched.name} would raise the rate, not lower it")
        if self.data.group_by_length and not any(i.variable for i in task.inputs):
            raise ConfigError(f"data.group_by_length groups samples by size, and task {task.name}'s inputs all have "
                              f"a fixed size: set it to false")
        if self.optim.name == "lbfgs" and self.data.skip_easiest:
            raise ConfigError("data.skip_easiest does not apply to optim.name lbfgs (one batch of the whole set); "
                              "set it to 0")
        if self.optim.name == "lbfgs" and self.run.precision == "fp16":
            raise ConfigError("optim.name lbfgs cannot run with run.precision fp16 (GradScaler takes no closure)")
        return self


def build_config(task: str | None, layers: list[dict[str, Any]]) -> Config:
    """Apply `layers` (dicts of {section: {field: value}}) over the defaults for the task.

    The task comes from `task`, else from the last layer that names one, else 'product'.
    """
    if task is None:
        task = next((l["run"]["task"] for l in reversed(layers) if "task" in (l.get("run") or {})), "product")
    task = coerce(task, str, "run.task")
    cfg = Config()
    cfg.run.task = task
    defaults = {**cfg.task.defaults, "model": {"arch": cfg.task.arch, **cfg.task.defaults.get("model", {})}}
    cfg.model = {}
    for layer in [defaults, *layers, {"run": {"task": task}}]:
        _apply(cfg, layer)
    return cfg.check()


def _apply(cfg: Config, layer: dict[str, Any]) -> None:
    if not isinstance(layer, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(layer).__name__}")
    for section, values in layer.items():
        if section not in SECTIONS and section != "model":
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join([*SECTIONS, 'model'])}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        if section == "model":
            _apply_model(cfg, values)
            continue
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}; known: {', '.join(hints)}")
            if (section, key) == ("run", "task"):  # fixed by build_config before any layer: --task, else the last layer's
                continue
            setattr(obj, key, coerce(value, hints[key], f"{section}.{key}"))


def _apply_model(cfg: Config, values: dict[str, Any]) -> None:
    merged = dict(cfg.model)
    if "arch" in values and values["arch"] != merged.get("arch"):
        merged = {"arch": values["arch"]}  # a new architecture starts from its own defaults
    arch = coerce(merged.get("arch"), str, "model.arch")
    task = cfg.task
    if arch not in task.models:
        raise ConfigError(f"unknown model.arch {arch!r} for task {task.name}; choose one of {', '.join(task.models)}")
    hints = typing.get_type_hints(task.models[arch].config)
    for key, value in values.items():
        if key == "arch":
            continue
        if key not in hints:
            raise ConfigError(f"unknown config key model.{key} for arch {arch}; known: arch, {', '.join(hints)}")
        merged[key] = coerce(value, hints[key], f"model.{key}")
    try:  # the dataclass's own __post_init__ checks ranges
        model_cfg = task.model_config(arch, {k: v for k, v in merged.items() if k != "arch"})
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    cfg.model = {"arch": arch, **asdict(model_cfg)}


def coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` (from YAML, or a CLI string) as type `tp`, or ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [coerce(v, item, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML `hflip: 1`, as on the command line
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # also YAML's '1e-3', which PyYAML reads as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):  # nan, inf and 1e400 are nonsense for every setting here
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name} has an unsupported type {tp}")


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """`--section.field value` or `--section.field=value` pairs -> {section: {field: 'value'}}."""
    layer: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --section.field value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        if not section or not name or "." in name:
            raise ConfigError(f"bad override --{key}; use --section.field value")
        layer.setdefault(section, {})[name] = value
        i += 1
    return layer


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _between(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")

