"""The built-in tasks, written with the public `t2d.Task` API that users' tasks use."""

from t2d.builtin.images import FASHION_MNIST, MNIST
from t2d.builtin.product import TASK as PRODUCT

BUILTIN = {t.name: t for t in (PRODUCT, MNIST, FASHION_MNIST)}
