"""Turning a task reference (`package.module:name`, `path/to/file.py:name`) into a Task, and a
Task into its model: every way a user's code can fail here becomes one TaskError line."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from lbgm.common.errors import TaskError
from lbgm.task import Task, TaskOptions
from lbgm.tasks import BUILTIN_TASK  # noqa: F401 - the default reference, imported from here by the workers

REFERENCE_FORMS = "package.module:name or path/to/file.py:name"
T = TypeVar("T")


def _is_file_reference(location: str) -> bool:
    return location.endswith(".py") or "/" in location or "\\" in location


def _import_file(path: Path, reference: str) -> ModuleType:
    """The module of a task file, registered in sys.modules under a name unique to its path."""
    if not path.is_file():
        raise TaskError(f"task {reference!r}: no file {path}")
    resolved = path.resolve()
    name = f"lbgm_task_file_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise TaskError(f"task {reference!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve_reference(reference: str) -> Any:
    """The object a reference names (not yet checked to be a Task)."""
    location, colon, attribute = reference.rpartition(":")
    if not colon or not location or not attribute.isidentifier():
        raise TaskError(f"task reference {reference!r} must look like {REFERENCE_FORMS}")
    try:
        if _is_file_reference(location):
            module = _import_file(Path(location), reference)
        else:
            module = importlib.import_module(location)
    except TaskError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's module may raise anything while importing
        raise TaskError(f"task {reference!r}: cannot import {location}: {type(error).__name__}: {error}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise TaskError(f"task {reference!r}: {location} has no attribute {attribute!r}") from None


def check_reference(reference: str) -> Task | Callable[[TaskOptions], Task]:
    """The Task, or the factory of one, that a reference names."""
    named = resolve_reference(reference)
    if not isinstance(named, Task) and not callable(named):
        raise TaskError(f"task {reference!r} is a {type(named).__name__}, expected a lbgm.task.Task or a "
                        f"function of lbgm.task.TaskOptions returning one")
    return named


def load_task(reference: str, options: TaskOptions) -> Task:
    """The Task a reference names: the object itself, or what its factory returns for `options`."""
    named = check_reference(reference)
    if isinstance(named, Task):
        return named
    made = call_task(reference, "the factory", named, options)
    if not isinstance(made, Task):
        raise TaskError(f"task {reference!r}: the factory returned a {type(made).__name__}, expected a lbgm.task.Task")
    return made


def call_task(reference: str, what: str, function: Callable[..., T], *args: object) -> T:
    """function(*args) of the user's task, any failure turned into a TaskError naming `what` failed."""
    try:
        return function(*args)
    except TaskError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's code may raise anything
        raise TaskError(f"task {reference!r}: {what} raised {type(error).__name__}: {error}") from None


def seeded(seed: int, make: Callable[[], T]) -> T:
    """make() under torch.manual_seed(seed), leaving the caller's global random state as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return make()
    finally:
        torch.random.set_rng_state(generator_state)


def build_model(task: Task, seed: int, reference: str = "") -> nn.Module:
    """The task's model, initialised under torch.manual_seed(seed): the same seed gives the same weights."""
    model = call_task(reference, "the model factory", seeded, seed, task.model)
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {reference!r}: the model factory returned a {type(model).__name__}, "
                        f"expected a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise TaskError(f"task {reference!r}: the model has no parameters, so there is nothing to train")
    return model


def check_task(reference: str, options: TaskOptions, seed: int) -> None:
    """Raise TaskError unless the task loads and builds its model: what a command checks before it
    writes anything."""
    build_model(load_task(reference, options), seed, reference)
