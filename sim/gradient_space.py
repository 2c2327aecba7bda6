"""The paper's motivating analysis: how low-rank is the space of gradients?

Azam et al. (ICLR 2022, section 2) train a model centrally, keep every
epoch's accumulated gradient (the sum of that epoch's minibatch gradients)
per layer, and count how many principal components of the gradients of
epochs 1..e explain 95% and 99% of their variance: N95(e), N99(e). Counts
far below e say that new gradients keep falling into the span of old ones,
which is the bet LBGM makes when it sends rho instead of a gradient.

Centering: none. The count is taken from the singular values of the raw
row-stacked gradients G (e x values), i.e. it measures the linear span of
the gradients. That is the quantity LBGM exploits: it rebuilds a gradient
as rho * LBG, a line through the origin, and never subtracts a mean
gradient. Uncentered analysis is also defined from the first epoch on
(centering over epochs leaves nothing at e = 1). The authors' script
(FedOptim, src/process_grads.py) fits sklearn's PCA to G transposed, which
subtracts each gradient's mean over its own entries. Measured on the CNN
(3,000 embedded MNIST images, 8 epochs) the two give identical counts for
the layers of 5,000 values and more, and differ by at most 2 for the small
bias and first-convolution tensors.

Computation: the squared singular values of G are the eigenvalues of the
e x e Gram matrix G G^T (float64), and the Gram matrix of epochs 1..e is the
leading block of the one for all epochs, so one pass of inner products
serves every epoch: far cheaper than an SVD of e x 400k rows per epoch.
Squaring loses components below ~1e-16 of the largest, which cannot move a
95% or 99% count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lbgm.task import Examples
from lbgm.tasks.datasets import load_dataset
from lbgm.tasks.image import accuracy_and_loss
from lbgm.tasks.models import build_model
from lbgm.worker.trainer import LocalTrainer

FRACTIONS = (0.95, 0.99)
# Relative slack when comparing explained variance with the fraction, so
# that float round-off cannot add a component (it matters at fraction 1).
_SLACK = 1e-12


@dataclass(frozen=True)
class LayerSpectrum:
    """N95 and N99 of one parameter tensor, entry e-1 for epochs 1..e."""

    name: str
    num_values: int
    n95: tuple[int, ...]
    n99: tuple[int, ...]


@dataclass(frozen=True)
class GradientHistory:
    """Per-epoch accumulated gradients, flattened, per named parameter tensor."""

    rows: dict[str, list[torch.Tensor]]
    epoch_losses: tuple[float, ...]  # mean minibatch training loss of each epoch


@dataclass(frozen=True)
class AnalysisSettings:
    dataset: str
    model: str
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    max_samples: int | None = None  # the first N training samples; None = all
    data_dir: Path | None = None


@dataclass(frozen=True)
class GradientSpaceReport:
    settings: AnalysisSettings
    train_samples: int
    epoch_losses: tuple[float, ...]
    test_accuracy: float  # of the model after the last epoch
    layers: tuple[LayerSpectrum, ...]


def gram_matrix(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """G G^T in float64 for the rows flattened: entry (i, j) = <row i, row j>."""
    if not rows:
        raise ValueError("need at least one gradient row, got none")
    matrix = torch.stack([row.reshape(-1).to(torch.float64) for row in rows])
    return matrix @ matrix.T


def squared_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a Gram matrix, largest first, round-off negatives clamped to 0."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0.0)


def components_for_fraction(squared_values: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k squared singular values (given largest first) reach `fraction` of their total.

    A zero matrix has no variance to explain, so its count is 0 (never NaN).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    values = squared_values.to(torch.float64)
    total = float(values.sum())
    if total == 0.0:
        return 0
    reached = torch.cumsum(values, dim=0) >= fraction * total * (1.0 - _SLACK)
    return int(torch.nonzero(reached)[0]) + 1


def counts_per_epoch(rows: Sequence[torch.Tensor], fraction: float) -> tuple[int, ...]:
    """N_fraction(e) for e = 1..len(rows): the count over the first e rows."""
    gram = gram_matrix(rows)
    return tuple(components_for_fraction(squared_singular_values(gram[:e, :e]), fraction)
                 for e in range(1, len(rows) + 1))


def layer_spectrum(name: str, rows: Sequence[torch.Tensor]) -> LayerSpectrum:
    n95, n99 = (counts_per_epoch(rows, fraction) for fraction in FRACTIONS)
    return LayerSpectrum(name=name, num_values=rows[0].numel(), n95=n95, n99=n99)


def record_epoch_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                           batch_size: int, lr: float, seed: int, progress: bool = True) -> GradientHistory:
    """Train `model` in place with minibatch SGD and keep each epoch's accumulated gradient.

    An epoch is len(labels) // batch_size steps over a fresh permutation (the
    last partial batch is dropped), which is the worker trainer's schedule, so
    the recorded gradient is exactly what a worker would upload after one epoch.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    names = [name for name, _ in model.named_parameters()]
    trainer = LocalTrainer.default(model, Examples(images, labels), seed=seed)
    steps = max(1, trainer.num_samples // batch_size)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    losses = []
    with tqdm(range(1, epochs + 1), desc="epochs", unit="epoch", disable=not progress, dynamic_ncols=True) as bar:
        for _ in bar:
            # The trainer starts from the state it is given: parameters, then buffers (BatchNorm statistics).
            start = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
            gradient, loss = trainer.train(start, steps, batch_size, lr)
            for name, tensor in zip(names, gradient, strict=True):
                rows[name].append(tensor.reshape(-1))
            losses.append(loss)
            bar.set_postfix_str(f"loss {loss:.4f}")
    return GradientHistory(rows=rows, epoch_losses=tuple(losses))


def run_analysis(settings: AnalysisSettings, progress: bool = True) -> GradientSpaceReport:
    """Train centrally as `settings` say, then N95/N99 per layer and epoch."""
    train = load_dataset(settings.dataset, "train", settings.data_dir)
    test = load_dataset(settings.dataset, "test", settings.data_dir)
    count = len(train) if settings.max_samples is None else min(settings.max_samples, len(train))
    model = build_model(settings.model, settings.seed, tuple(train.images.shape[1:]), train.num_classes)
    history = record_epoch_gradients(model, train.images[:count], train.labels[:count], settings.epochs,
                                     settings.batch_size, settings.lr, settings.seed, progress)
    accuracy = accuracy_and_loss(model, Examples(test.images, test.labels), batch_size=1000).accuracy
    layers = tuple(layer_spectrum(name, rows) for name, rows in history.rows.items())
    return GradientSpaceReport(settings=settings, train_samples=count, epoch_losses=history.epoch_losses,
                               test_accuracy=accuracy, layers=layers)
