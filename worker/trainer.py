"""Local training: the task's training (default: tau SGD steps) from the global model on the
worker's shard, turned into the update g the server steps on (the definition is in lbgm.task).

The model lives on the worker's device (--device); the global state that arrived is copied to
it, the training runs there and g is computed there. Buffers leave as CPU tensors, as they travel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lbgm.task import Evaluation, Examples, LocalRound, LocalResult, Task


def local_seed(experiment_seed: int, shard_index: int) -> int:
    """Seed of a worker's minibatch order: distinct per shard, fixed per experiment."""
    return experiment_seed * 100_003 + shard_index


def placed(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`; one already there is returned untouched. Module.to walks every parameter's
    gradient even when nothing moves, which races with a training of the same module in another thread
    (the virtual workers of a process may share one model: bench/shared_model_task.py)."""
    if all(tensor.device == device for tensor in (*model.parameters(), *model.buffers())):
        return model
    return model.to(device)


@dataclass(frozen=True)
class BatchPosition:
    """Where the minibatch order stands: a worker returning to an earlier round restores it, so a
    redone round trains on the same minibatches as the first attempt."""

    random_state: torch.Tensor
    order: torch.Tensor  # never edited in place: a new epoch makes a new permutation
    cursor: int


class LocalTrainer:
    def __init__(self, task: Task, model: nn.Module, data: Any, seed: int,
                 device: torch.device = torch.device("cpu"), validation: Callable[[], Any] | None = None) -> None:
        """`validation` loads the worker's held-out data (the task's validation_data) at the first
        evaluation, so a run without federated evaluation never loads it; None: there is none."""
        if len(data) == 0:
            raise ValueError("a worker needs at least one training sample")
        self.task = task
        self.device = device
        self.model = placed(model, device)
        self.data = data
        self._load_validation = validation
        self._validation: Any = None
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64)
        self._cursor = 0

    @classmethod
    def default(cls, model: nn.Module, data: Examples, seed: int) -> LocalTrainer:
        """The default training (SGD, cross-entropy) of `model` on `data`, outside any task: for analyses."""
        return cls(Task(model=lambda: model, train_data=lambda _: data), model, data, seed)

    @property
    def num_samples(self) -> int:
        return len(self.data)

    def position(self) -> BatchPosition:
        return BatchPosition(self._generator.get_state(), self._order, self._cursor)

    def restore(self, position: BatchPosition) -> None:
        self._generator.set_state(position.random_state)
        self._order, self._cursor = position.order, position.cursor

    def _next_batch(self, batch_size: int) -> torch.Tensor:
        """Indices of the next minibatch; epochs are fresh random permutations."""
        if batch_size == 0 or batch_size >= self.num_samples:
            return torch.arange(self.num_samples)
        if self._cursor + batch_size > len(self._order):
            self._order = torch.randperm(self.num_samples, generator=self._generator)
            self._cursor = 0
        batch = self._order[self._cursor:self._cursor + batch_size]
        self._cursor += batch_size
        return batch

    def train(self, global_state: Sequence[torch.Tensor], local_steps: int, batch_size: int,
              lr: float, round_number: int = 0) -> tuple[list[torch.Tensor], float]:
        """(update g per parameter, mean training loss over the steps).

        `global_state` is the global model's parameters followed by its buffers;
        afterwards `buffers()` holds this worker's updated buffers (e.g. BatchNorm statistics).
        """
        self._load(global_state)
        params = list(self.model.parameters())
        start = [value.to(self.device) for value in global_state[:len(params)]]
        result = self.task.train(LocalRound(
            model=self.model, data=self.data, loss=self.task.loss, steps=local_steps, batch_size=batch_size, lr=lr,
            round=round_number, generator=self._generator, next_batch=self._next_batch, device=self.device))
        return update_of(result, start, params, lr), float(result.loss)

    def _load(self, global_state: Sequence[torch.Tensor]) -> None:
        """Put the global model (parameters, then buffers) into the worker's model."""
        with torch.no_grad():
            for target, value in zip([*self.model.parameters(), *self.model.buffers()], global_state, strict=True):
                target.copy_(value)

    def evaluate(self, global_state: Sequence[torch.Tensor]) -> Evaluation | None:
        """The task's evaluation of the global model on this worker's held-out data (federated
        evaluation); None if the task has no validation data or no evaluate. The model's train/eval
        mode is left as it was, so the round's training that follows is the same as without it."""
        if self._load_validation is None or self.task.evaluate is None:
            return None
        if self._validation is None:
            self._validation = self._load_validation()
        self._load(global_state)
        training = self.model.training
        try:
            result = self.task.evaluate(self.model, self._validation)
        finally:
            self.model.train(training)
        if not isinstance(result, Evaluation):
            raise TypeError(f"the task's evaluate returned a {type(result).__name__}, expected a lbgm.task.Evaluation")
        return result if result.samples else dataclasses.replace(result, samples=len(self._validation))

    def buffers(self) -> list[torch.Tensor]:
        """The model's buffers after training, as CPU copies (what travels)."""
        return [buffer.detach().to("cpu", copy=True) for buffer in self.model.buffers()]


def update_of(result: LocalResult, start: Sequence[torch.Tensor], trained: Sequence[torch.Tensor],
              lr: float) -> list[torch.Tensor]:
    """The update g of a local training: the gradient it returned, else (theta - theta_local) / lr."""
    if not isinstance(result, LocalResult):
        raise TypeError(f"the task's training returned a {type(result).__name__}, expected a lbgm.task.LocalResult")
    if result.gradient is None:
        with torch.no_grad():
            return [(before - after.detach()) / lr for before, after in zip(start, trained, strict=True)]
    gradient = [g.detach() for g in result.gradient]
    shapes = [tuple(g.shape) for g in gradient]
    expected = [tuple(p.shape) for p in trained]
    if shapes != expected:
        raise ValueError(f"the task's training returned gradients of shapes {shapes}, expected {expected}")
    return gradient
