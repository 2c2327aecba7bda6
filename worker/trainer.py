"""Local training: tau SGD steps from the global model on the worker's shard.

The update is the accumulated gradient g = sum of the tau minibatch
gradients, i.e. (theta_t - theta_local) / lr for plain SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def local_seed(experiment_seed: int, shard_index: int) -> int:
    """Seed of a worker's minibatch order: distinct per shard, fixed per experiment."""
    return experiment_seed * 100_003 + shard_index


@dataclass(frozen=True)
class BatchPosition:
    """Where the minibatch order stands: a worker returning to an earlier round restores it, so a
    redone round trains on the same minibatches as the first attempt."""

    random_state: torch.Tensor
    order: torch.Tensor  # never edited in place: a new epoch makes a new permutation
    cursor: int


class LocalTrainer:
    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        if len(labels) == 0:
            raise ValueError("a worker needs at least one training sample")
        self.model = model
        self.images = images
        self.labels = labels
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64)
        self._cursor = 0

    @property
    def num_samples(self) -> int:
        return len(self.labels)

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
              lr: float) -> tuple[list[torch.Tensor], float]:
        """(accumulated gradient per parameter, mean training loss over the steps).

        `global_state` is the global model's parameters followed by its buffers;
        afterwards `buffers()` holds this worker's updated BatchNorm statistics.
        """
        params = list(self.model.parameters())
        with torch.no_grad():
            for target, value in zip([*params, *self.model.buffers()], global_state, strict=True):
                target.copy_(value)
        accumulated = [torch.zeros_like(p) for p in params]
        self.model.train()
        loss_sum = 0.0
        for _ in range(local_steps):
            batch = self._next_batch(batch_size)
            for param in params:
                param.grad = None
            loss = F.cross_entropy(self.model(self.images[batch]), self.labels[batch])
            loss.backward()
            loss_sum += loss.item()
            with torch.no_grad():
                for param, acc in zip(params, accumulated):
                    acc.add_(param.grad)
                    param.sub_(param.grad, alpha=lr)
        return accumulated, loss_sum / local_steps

    def buffers(self) -> list[torch.Tensor]:
        return [buffer.detach().clone() for buffer in self.model.buffers()]
