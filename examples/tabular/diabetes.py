"""A regression task on real tabular data: disease progression of 442 diabetes patients from 10
baseline measurements (scikit-learn's bundled `load_diabetes`, read from the installed package).

Everything but the federation is this file's own: the split, a small MLP, the Huber loss, an Adam
loop and the RMSE/R^2 evaluation. lbgm federates it with LBGM (README.md beside this file).

    lbgm sweep --config examples/tabular/experiment.toml      # delta 0.2 and its delta = 0 baseline
    python examples/tabular/score.py runs/sweeps/tabular       # RMSE, R^2, uplink bytes, savings
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.nn import functional as F

from lbgm.task import Evaluation, Examples, LocalResult, LocalRound, Shard, Task

TEST_FRACTION = 0.2  # patients held out for the server's central evaluation
VALIDATION_FRACTION = 0.2  # of each worker's patients, held out for federated evaluation
SPLIT_SEED = 2024  # fixes the test patients, so every run is scored on the same ones
HUBER_DELTA = 1.0  # in standard deviations of the target: beyond it the loss grows linearly


@dataclass(frozen=True)
class Diabetes:
    """The data set standardised with the training patients' statistics (no test information leaks in)."""

    train: Examples  # every training patient; workers split these
    test: Examples
    target_mean: float
    target_std: float  # to turn standardised errors back into the target's units


@functools.cache
def diabetes() -> Diabetes:
    """load_diabetes split once into training and test patients by a fixed permutation."""
    features, target = load_diabetes(return_X_y=True, scaled=False)
    inputs = torch.tensor(features, dtype=torch.float32)
    targets = torch.tensor(target, dtype=torch.float32).unsqueeze(1)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test_count = round(TEST_FRACTION * len(targets))
    test_rows, train_rows = order[:test_count], order[test_count:]
    mean, std = inputs[train_rows].mean(0), inputs[train_rows].std(0)
    target_mean, target_std = targets[train_rows].mean(), targets[train_rows].std()

    def standardised(rows: torch.Tensor) -> Examples:
        return Examples((inputs[rows] - mean) / std, (targets[rows] - target_mean) / target_std)

    return Diabetes(standardised(train_rows), standardised(test_rows), float(target_mean), float(target_std))


def worker_rows(shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's training and validation rows: the training patients shuffled by the experiment
    seed, cut into `count` near-equal parts, and the last VALIDATION_FRACTION of part `index` held out.
    The server and every worker compute the same split."""
    patients = len(diabetes().train)
    order = torch.randperm(patients, generator=torch.Generator().manual_seed(shard.seed))
    part = torch.tensor_split(order, shard.count)[shard.index]
    validation_count = round(VALIDATION_FRACTION * len(part))
    return part[:len(part) - validation_count], part[len(part) - validation_count:]


def rows_of(examples: Examples, rows: torch.Tensor) -> Examples:
    return Examples(examples.inputs[rows], examples.targets[rows])


def train_data(shard: Shard) -> Examples:
    return rows_of(diabetes().train, worker_rows(shard)[0])


def validation_data(shard: Shard) -> Examples:
    return rows_of(diabetes().train, worker_rows(shard)[1])


def test_data(data_dir: Path | None) -> Examples:
    return diabetes().test  # shipped inside scikit-learn: no data folder needed


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def huber(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(outputs, targets, delta=HUBER_DELTA)


def adam(local: LocalRound) -> LocalResult:
    """`steps` Adam steps on minibatches drawn from the round's generator; a fresh Adam each round (its
    moments stay on the worker, the server averages the trained models: FedAvg)."""
    optimizer = torch.optim.Adam(local.model.parameters(), lr=local.lr)
    local.model.train()
    total = 0.0
    for _ in range(local.steps):
        inputs, targets = local.data.batch(local.next_batch(local.batch_size))
        optimizer.zero_grad()
        loss = local.loss(local.model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return LocalResult(total / local.steps)  # g = (theta - theta_local) / lr


@dataclass(frozen=True)
class Scores:
    """How well a model predicts disease progression, in the target's own units."""

    rmse: float
    r2: float  # 1 - squared error / the held-out targets' own variance


@torch.inference_mode()
def scores(model: nn.Module, data: Examples) -> Scores:
    model.eval()
    errors = model(data.inputs) - data.targets
    squared = float(errors.pow(2).mean())
    variance = float((data.targets - data.targets.mean()).pow(2).mean())
    return Scores(math.sqrt(squared) * diabetes().target_std, 1.0 - squared / variance)


def evaluate(model: nn.Module, data: Examples) -> Evaluation:
    """Loss: the RMSE in the target's units (what the README reports); accuracy has no meaning for a
    regression and stays NaN."""
    return Evaluation(loss=scores(model, data).rmse)


task = Task(model=mlp, train_data=train_data, train=adam, loss=huber, validation_data=validation_data,
            test_data=test_data, evaluate=evaluate)
