"""The task API: one object describes a federated job lbgm runs (docs/TASKS.md).

A `Task` says how to build the model, which training data each worker holds, how a worker
trains locally each round, and (optionally) how the server evaluates the global model.
`lbgm run|server|worker|sweep --task REFERENCE` (or `task = "..."` in the TOML config) names
one: `package.module:name` or `path/to/file.py:name`, where `name` is a `Task` or a factory
`name(options: TaskOptions) -> Task`. lbgm's own image-classification job is such a factory
(`lbgm.tasks.image:classification`, the default).

The update: what a worker's training gives the server
-----------------------------------------------------
Each round a sampled worker receives the global model theta, trains locally and returns an
update g (one tensor per parameter). LBGM decides per layer whether g travels in full or as
one scalar times the layer's look-back gradient. The server averages the updates weighted by
the workers' sample counts n_k, G = sum_k n_k g_k / sum_k n_k, and steps

    theta <- theta - server_lr * G        (heavy-ball momentum on G if server_momentum > 0)

with server_lr = local_lr unless set. What g is:

- The default training (`sgd_steps`): tau steps of plain SGD with the task's loss (cross-entropy
  unless the task names another); g is the sum of the tau minibatch gradients, i.e.
  (theta - theta_local) / local_lr. The server step with server_lr = local_lr is FedAvg.
- A custom training (`Task.train`: any loop, loss, optimizer, batches, augmentation) trains the
  model it is given in place and returns `LocalResult(loss)`; the library sets

      g = (theta - theta_local) / local_lr

  the weight change in units of the local learning rate. With server_lr = local_lr the server
  step is theta <- sum_k n_k theta_local,k / sum_k n_k: FedAvg, whatever the local optimizer
  (Adam, ...); with server_momentum > 0 it is FedAvgM. A training that computes its own g
  returns `LocalResult(loss, gradient=g)` instead, as `sgd_steps` does (the sum of the
  gradients is exact, the weight difference over the learning rate only up to round-off).

Buffers (e.g. BatchNorm statistics) travel as they are after training; the server averages
them weighted by sample counts. Everything random in a custom training should draw from
`LocalRound.generator`: the library saves and restores its state, so a round redone after a
server resumed from a checkpoint trains on the same batches as the first attempt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from lbgm.common.devices import move_to


@dataclass(frozen=True)
class TaskOptions:
    """Experiment settings a task factory may read; the server sends them to every worker, so all
    build the same task. The built-in image-classification task reads all of them; a user's
    factory may use them as its own knobs or ignore them."""

    dataset: str = "mnist-embedded"
    model: str = "mlp"
    partition: str = "iid"
    classes_per_worker: int = 3
    dirichlet_alpha: float = 0.5
    eval_batch_size: int = 1000
    init: str = "default"  # built-in task's initial weights; only the server builds them, so not sent to workers


@dataclass(frozen=True)
class Shard:
    """Which part of the training data a worker holds: shard `index` of `count`, split
    deterministically for `seed` (the server and every worker must compute the same split)."""

    index: int
    count: int
    seed: int
    data_dir: Path | None  # the worker's --data-dir (the server's data_dir setting), None if not given


class Batches(Protocol):
    """Training data the default training can use: a sample count and minibatches by index."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> tuple[Any, torch.Tensor]: ...


@dataclass(frozen=True)
class Examples:
    """Inputs and targets as in-memory tensors, one sample per row."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]


@dataclass
class LocalRound:
    """One round of local training on a worker, as `Task.train` receives it."""

    model: nn.Module  # holds the global model (parameters and buffers); train it in place
    data: Any  # what Task.train_data returned for this worker
    loss: Callable[[Any, torch.Tensor], torch.Tensor]  # the task's loss(outputs, targets)
    steps: int  # tau, the round's local steps
    batch_size: int  # 0 = the whole shard in one batch
    lr: float  # the local learning rate (also the unit of the update, see the module doc)
    round: int
    generator: torch.Generator  # the worker's random stream: draw shuffles and augmentation from it
    next_batch: Callable[[int], torch.Tensor]  # indices of the next minibatch of that size (random epochs)
    device: torch.device = torch.device("cpu")  # the worker's --device, where `model` lives: move batches to it


@dataclass(frozen=True)
class LocalResult:
    """What a local training returns: its mean training loss, and the update g if it computes it
    (None: the library takes g = (theta - theta_local) / lr from the trained model)."""

    loss: float
    gradient: Sequence[torch.Tensor] | None = None


@dataclass(frozen=True)
class Evaluation:
    """An evaluation of a global model: its loss (which the server's round guard watches in a central
    evaluation), its accuracy if the task has one, and the task's own figures (`metrics`, e.g.
    {"f1": 0.8}; at most 32 finite values in a federated evaluation). `samples`: how many held-out
    samples the figures cover; a federated evaluation weights each worker's figures by it (lbgm
    sets it to len(validation data) when the task leaves it 0)."""

    loss: float
    accuracy: float = math.nan
    metrics: Mapping[str, float] = field(default_factory=dict)
    samples: int = 0


def sgd_steps(local: LocalRound) -> LocalResult:
    """The default local training: `steps` plain SGD steps with the task's loss; g is the sum of
    the minibatch gradients."""
    params = list(local.model.parameters())
    accumulated = [torch.zeros_like(p) for p in params]
    local.model.train()
    loss_sum = 0.0
    for _ in range(local.steps):
        inputs, targets = move_to(local.data.batch(local.next_batch(local.batch_size)), local.device)
        for param in params:
            param.grad = None
        loss = local.loss(local.model(inputs), targets)
        loss.backward()
        loss_sum += loss.item()
        with torch.no_grad():
            for param, acc in zip(params, accumulated):
                acc.add_(param.grad)
                param.sub_(param.grad, alpha=local.lr)
    return LocalResult(loss_sum / local.steps, accumulated)


@dataclass(frozen=True)
class Task:
    """A federated job. Only `model` and `train_data` are required.

    model: builds the model; called under torch.manual_seed(experiment seed), so the server and
        every worker build the same initial weights. Its parameter order is the LBGM layer order.
    train_data: a worker's training data for its Shard; anything with len() (the sample count,
        which weights the worker's update); the default training needs `Batches` (e.g. Examples).
    train: the local training (default `sgd_steps`); see the module doc for what it returns.
    loss: loss(outputs, targets) for `sgd_steps` and any training that wants it (default
        cross-entropy).
    validation_data: a worker's held-out data for its Shard: with `evaluate`, the worker evaluates
        the global model on it when the server asks (federated evaluation, docs/TASKS.md).
    test_data, evaluate: the server's central evaluation each round, evaluate(model,
        test_data(data_dir)) -> Evaluation; without them the server records no test figures and
        its round guard checks only that the model stays finite.
    describe_shards: a table of all shards' training data for the run's partition.txt
        (default: each shard's sample count).
    """

    model: Callable[[], nn.Module]
    train_data: Callable[[Shard], Any]
    train: Callable[[LocalRound], LocalResult] = sgd_steps
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy
    validation_data: Callable[[Shard], Any] | None = None
    test_data: Callable[[Path | None], Any] | None = None
    evaluate: Callable[[nn.Module, Any], Evaluation] | None = None
    describe_shards: Callable[[Sequence[Any]], str] | None = None


__all__ = ["Batches", "Evaluation", "Examples", "LocalResult", "LocalRound", "Shard", "Task", "TaskOptions",
           "sgd_steps"]
