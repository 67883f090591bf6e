"""MNIST and Fashion-MNIST: 28x28 grey images in [0, 1], ten classes.

The IDX files are read from --data-dir, else data/<task> (and, for Fashion-MNIST, Debian's
dataset-fashion-mnist package), else torchvision downloads them where the network allows.
Validation images are held out of the 60,000 training images by the trainer (`Splits.val` None).
"""

from functools import partial
from pathlib import Path

from models.image import CNN, MLP, CNNConfig, MLPConfig
from t2d.errors import DataError
from t2d.idx import IDX_FILES, find_idx_files, images_and_labels
from t2d.task import DataOptions, Input, Model, Output, Splits, Task

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def idx_files(name: str, torchvision_name: str, extra: tuple[Path, ...], opts: DataOptions) -> dict[str, Path]:
    root = Path(opts.dir) if opts.dir else Path("data") / name
    folders = [root, root / torchvision_name / "raw", *([] if opts.dir else extra)]
    found = find_idx_files(folders, root if opts.download else None, torchvision_name)
    if found:
        return found
    where = " or ".join(map(str, [root, *([] if opts.dir else extra)]))
    hint = " (or apt-get install dataset-fashion-mnist)" if extra else ""
    raise DataError(
        f"no {torchvision_name} IDX files in {where} and {'download failed' if opts.download else 'download is off'}: "
        f"put {', '.join(n + '.gz' for n in IDX_FILES.values())} in {root} or pass --data-dir{hint}")


def image_data(name: str, torchvision_name: str, extra: tuple[Path, ...], classes: int, opts: DataOptions) -> Splits:
    files = idx_files(name, torchvision_name, extra, opts)
    train = images_and_labels(files["train_images"], files["train_labels"])
    test = images_and_labels(files["test_images"], files["test_labels"])
    top = int(max(train[1].max(), test[1].max()))
    if top >= classes:
        raise DataError(f"labels go up to {top}, but {name} has {classes} classes")
    return Splits(train=train, test=test)


def build_mlp(cfg: MLPConfig, task: Task) -> MLP:
    return MLP(cfg, task.input.shape, task.output.size)


def build_cnn(cfg: CNNConfig, task: Task) -> CNN:
    return CNN(cfg, task.input.shape, task.output.size)


MODELS = {"mlp": Model(MLPConfig, build_mlp), "cnn": Model(CNNConfig, build_cnn)}
IMAGE = Input("image", (1, 28, 28), range=(0.0, 1.0), normalize="global", description="grayscale pixels in [0, 1]")
LOGITS = Output("logits", 10, description="unnormalized class scores; softmax gives probabilities")
DEFAULTS = {"run": {"epochs": 5}, "data": {"batch_size": 64, "val_size": 5000}}


def _task(name: str, torchvision_name: str, classes: tuple[str, ...], extra: tuple[Path, ...] = ()) -> Task:
    return Task(name=name, kind="classification", input=IMAGE, output=LOGITS, classes=classes,
                data=partial(image_data, name, torchvision_name, extra, len(classes)), models=MODELS,
                default_model="mlp", defaults=DEFAULTS, description=f"{torchvision_name} 28x28 image classes")


MNIST = _task("mnist", "MNIST", tuple(str(d) for d in range(10)))
FASHION_MNIST = _task("fashion-mnist", "FashionMNIST", FASHION_CLASSES, (DEBIAN_FASHION_MNIST,))
