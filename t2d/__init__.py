"""train-to-deploy's public task API. See `t2d.task` and examples/.

    from t2d import DataOptions, Input, Model, Output, Splits, Task, Tokenizer

The names are imported on first use (PEP 562), so that `t2d.files`, which the server uses, loads
without torch: the server imports neither torch nor a task.
"""

import importlib
from typing import TYPE_CHECKING

from t2d.errors import DataError, TaskError

if TYPE_CHECKING:
    from t2d.task import Task

_TASK_API = ("DataOptions", "Input", "Model", "Output", "Splits", "Task")
_TEXT_API = ("Tokenizer",)


def __getattr__(name: str):
    if name in _TASK_API:
        return getattr(importlib.import_module("t2d.task"), name)
    if name in _TEXT_API:
        return getattr(importlib.import_module("t2d.text"), name)
    raise AttributeError(f"module 't2d' has no attribute {name!r}")


def builtin_tasks() -> dict[str, "Task"]:
    from t2d.builtin import BUILTIN  # the built-in tasks import the networks: only when asked

    return BUILTIN


def resolve(ref: str) -> "Task":
    """The Task that `ref` names: a built-in task's name, or `module:attribute` of a user's own.

    The module is imported from sys.path (python -m puts the current folder first). Only a
    reference the user typed reaches here: a checkpoint's saved reference is never imported."""
    builtin = builtin_tasks()
    if ref in builtin:
        return builtin[ref]
    module_name, colon, attr = ref.partition(":")
    if not colon or not module_name or not attr:
        raise TaskError(f"unknown task {ref!r}; --task takes {', '.join(builtin)} or module:ATTRIBUTE "
                        "(a Task in a Python file on the path, e.g. my_task:TASK)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself, not one it imports
            raise TaskError(f"--task {ref}: no module {module_name!r} on the path (run from the folder that holds "
                            f"{module_name.replace('.', '/')}.py, or add it to PYTHONPATH)") from None
        raise TaskError(f"--task {ref}: importing {module_name} failed: {e}") from None
    except Exception as e:  # the user's module raised while importing: say where, in one line
        raise TaskError(f"--task {ref}: importing {module_name} failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    from t2d.task import Task

    task = getattr(module, attr, None)
    if task is None:
        raise TaskError(f"--task {ref}: module {module_name} has no attribute {attr!r}")
    if not isinstance(task, Task):
        raise TaskError(f"--task {ref} is a {type(task).__name__}, not a t2d.Task")
    if task.name in builtin and builtin[task.name] is not task:
        raise TaskError(f"--task {ref} is named {task.name!r}, a built-in task's name; give it another name")
    return task


def is_builtin(task: "Task") -> bool:
    return builtin_tasks().get(task.name) is task


__all__ = ["DataError", "DataOptions", "Input", "Model", "Output", "Splits", "Task", "TaskError", "Tokenizer",
           "is_builtin", "resolve"]
