"""A user's task, carried by a worker image built on top of lbgm's (Dockerfile beside this file).

Everything here is the user's own: a small CNN, the split of the data among workers, a training
loop (SGD with momentum and a fresh optimizer each round) and the evaluation. The data is the
handwritten-digit subset that ships inside lbgm (`mnist-embedded`); a real deployment would read
its own files from the worker's --data-dir (`shard.data_dir`, /data in the image).

The aggregation server never sees this file: it runs from the weights file that
`lbgm init-weights --task /opt/task/task.py:task` writes, and the workers evaluate the global model
on their held-out images when it asks (federated evaluation).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from lbgm.task import Evaluation, Examples, LocalResult, LocalRound, Shard, Task
from lbgm.tasks.datasets import load_dataset

MOMENTUM = 0.5  # the local optimizer's own momentum; it starts from zero every round


@functools.cache
def digits(split: str) -> Examples:
    dataset = load_dataset("mnist-embedded", split)
    return Examples(dataset.images, dataset.labels)


def rows(shard: Shard, total: int) -> torch.Tensor:
    """This worker's rows: all rows shuffled by the experiment seed, cut into `count` near-equal parts."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(shard.seed))
    return torch.tensor_split(order, shard.count)[shard.index]


def part(examples: Examples, shard: Shard) -> Examples:
    picked = rows(shard, len(examples))
    return Examples(examples.inputs[picked], examples.targets[picked])


def train_data(shard: Shard) -> Examples:
    return part(digits("train"), shard)


def validation_data(shard: Shard) -> Examples:
    return part(digits("test"), shard)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def sgd_with_momentum(local: LocalRound) -> LocalResult:
    """`steps` minibatches drawn from the round's generator; lbgm turns the weight change into the update."""
    optimizer = torch.optim.SGD(local.model.parameters(), lr=local.lr, momentum=MOMENTUM)
    local.model.train()
    total = 0.0
    for _ in range(local.steps):
        inputs, targets = local.data.batch(local.next_batch(local.batch_size))
        optimizer.zero_grad()
        loss = F.cross_entropy(local.model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return LocalResult(total / local.steps)


@torch.inference_mode()
def accuracy(model: nn.Module, data: Examples) -> Evaluation:
    model.eval()
    outputs = model(data.inputs)
    correct = (outputs.argmax(1) == data.targets).float().mean()
    return Evaluation(loss=float(F.cross_entropy(outputs, data.targets)), accuracy=float(correct))


task = Task(model=small_cnn, train_data=train_data, train=sgd_with_momentum,
            validation_data=validation_data, evaluate=accuracy)
