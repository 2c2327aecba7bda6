"""The paper's motivating analysis: how low-rank is the space of gradients?

Azam et al. (ICLR 2022, section 2) train a model centrally, keep every
epoch's accumulated gradient (the sum of that epoch's minibatch gradients)
per layer, and count how many principal components of the gradients of
epochs 1..e explain 95% and 99% of their variance: N95(e), N99(e). Counts
far below e say that new gradients keep falling into the span of old ones,
which is the bet LBGM makes when it sends rho instead of a gradient.

Centering: none by default. The count is taken from the singular values of
the raw row-stacked gradients G (e x values), i.e. it measures the linear
span of the gradients. That is the quantity LBGM exploits: it rebuilds a
gradient as rho * LBG, a line through the origin, and never subtracts a mean
gradient. Uncentered analysis is also defined from the first epoch on. The
authors' script (FedOptim, src/process_grads.py) fits sklearn's PCA to G
transposed, which subtracts each gradient's mean over its own entries:
`centered=True` does the same. Measured on the CNN (30,000 images, 50
epochs, docs/analysis/*-cnn-e50-n30000) the two differ by at most 1 for the
layers of 5,000 values and more, and by up to 5 for a 50-value bias; on the
FCN (101 epochs) they are identical.

Momentum: the authors' script analyses v_e = m v_(e-1) + g_e with m = 0.9
(src/sh/process_grads.sh, `--m 0.9`), not the raw epoch gradients g_e.
`momentum=m` does the same. Both momentum and centering are linear maps of
the rows (V = A G with A[e, i] = m^(e-i); a row's mean is its sum / values),
so they are applied to the Gram matrix and the row sums, never to the rows.

Unit rows (an option, in neither the paper nor the reference): the gradients
shrink as training converges, so the first epochs dominate the variance and
a late gradient outside their span moves N95 little. LBGM's phase error
ignores length, so `unit_rows=True` scales every row to length 1 first and
asks whether the directions themselves stay in a low-dimensional span.

Computation: the squared singular values of G are the eigenvalues of the
e x e Gram matrix G G^T (float64), and the Gram matrix of epochs 1..e is the
leading block of the one for all epochs, so one pass of inner products
serves every epoch: far cheaper than an SVD of e x 400k rows per epoch.
Squaring loses components below ~1e-16 of the largest, which cannot move a
95% or 99% count.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from lbgm.common.lookback import aggregation_weights, weighted_sum
from lbgm.experiment.config import ExperimentConfig
from lbgm.sim.federation import RoundGradients, simulate
from lbgm.task import Examples, Task
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
class RawGram:
    """One parameter tensor's series before any treatment: every count derives from it, and the archive
    (gradient_space_grams.safetensors) keeps it, so other treatments need no retraining."""

    name: str
    num_values: int
    gram: torch.Tensor  # e x e float64: <row i, row j>
    row_sums: torch.Tensor  # e float64: each row's sum over its entries


@dataclass(frozen=True)
class GradientHistory:
    """Per-epoch accumulated gradients, flattened, per named parameter tensor."""

    rows: dict[str, list[torch.Tensor]]
    epoch_losses: tuple[float, ...]  # mean minibatch training loss of each epoch


@dataclass(frozen=True)
class Treatment:
    """How the rows are turned into the matrix whose components are counted."""

    momentum: float = 0.0  # analyse v_e = momentum * v_(e-1) + g_e; 0 = the raw gradients
    centered: bool = False  # subtract each row's mean over its own entries (sklearn's PCA of G^T)
    unit_rows: bool = False  # then scale each row to length 1: every epoch's direction weighs alike


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
    weight_decay: float = 0.0  # L2 term of the training loss; its gradient is part of the recorded one
    treatment: Treatment = field(default_factory=Treatment)


@dataclass(frozen=True)
class GradientSpaceReport:
    settings: AnalysisSettings
    train_samples: int
    epoch_losses: tuple[float, ...]
    test_accuracy: float  # of the model after the last epoch
    grams: tuple[RawGram, ...]
    layers: tuple[LayerSpectrum, ...]  # the counts of the grams treated as settings.treatment says


def gram_matrix(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """G G^T in float64 for the rows flattened: entry (i, j) = <row i, row j>."""
    if not rows:
        raise ValueError("need at least one gradient row, got none")
    matrix = torch.stack([row.reshape(-1).to(torch.float64) for row in rows])
    return matrix @ matrix.T


def momentum_matrix(count: int, momentum: float) -> torch.Tensor:
    """A with (A G)_e = v_e = momentum * v_(e-1) + g_e, v_0 = 0: A[e, i] = momentum^(e-i) for i <= e."""
    steps = torch.arange(count, dtype=torch.float64)
    powers = torch.tensor(momentum, dtype=torch.float64) ** (steps[:, None] - steps[None, :]).clamp(min=0)
    return torch.tril(powers)


def treated_gram(gram: torch.Tensor, row_sums: torch.Tensor, num_values: int, treatment: Treatment) -> torch.Tensor:
    """The Gram matrix of the treated rows, from the raw rows' Gram matrix and sums.

    Momentum: V = A G, so V V^T = A (G G^T) A^T and V's sums are A s. Centering
    a row r of n values: <r_i - mean_i, r_j - mean_j> = <r_i, r_j> - s_i s_j / n.
    Unit rows: <r_i / |r_i|, r_j / |r_j|>, a zero row staying zero.
    """
    if treatment.momentum:
        mix = momentum_matrix(len(gram), treatment.momentum)
        gram, row_sums = mix @ gram @ mix.T, mix @ row_sums
    if treatment.centered:
        gram = gram - torch.outer(row_sums, row_sums) / num_values
    if treatment.unit_rows:
        lengths = gram.diagonal().clamp(min=0.0).sqrt()
        lengths = torch.where(lengths > 0, lengths, torch.ones_like(lengths))
        gram = gram / torch.outer(lengths, lengths)
    return gram


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


def counts_from_gram(gram: torch.Tensor, fraction: float) -> tuple[int, ...]:
    """N_fraction(e) for e = 1..len(gram): the Gram matrix of rows 1..e is its leading e x e block."""
    return tuple(components_for_fraction(squared_singular_values(gram[:e, :e]), fraction)
                 for e in range(1, len(gram) + 1))


def row_sums(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([row.to(torch.float64).sum() for row in rows])


def raw_gram(name: str, rows: Sequence[torch.Tensor]) -> RawGram:
    return RawGram(name=name, num_values=rows[0].numel(), gram=gram_matrix(rows), row_sums=row_sums(rows))


def layer_gram(rows: Sequence[torch.Tensor], treatment: Treatment = Treatment()) -> torch.Tensor:
    """The Gram matrix of the treated rows (one parameter tensor's gradient per epoch or round)."""
    return treated_gram(gram_matrix(rows), row_sums(rows), rows[0].numel(), treatment)


def counts_per_epoch(rows: Sequence[torch.Tensor], fraction: float, treatment: Treatment = Treatment()) -> tuple[int, ...]:
    """N_fraction(e) for e = 1..len(rows): the count over the first e rows, treated."""
    return counts_from_gram(layer_gram(rows, treatment), fraction)


def spectrum(raw: RawGram, treatment: Treatment = Treatment()) -> LayerSpectrum:
    gram = treated_gram(raw.gram, raw.row_sums, raw.num_values, treatment)
    n95, n99 = (counts_from_gram(gram, fraction) for fraction in FRACTIONS)
    return LayerSpectrum(name=raw.name, num_values=raw.num_values, n95=n95, n99=n99)


def raw_grams(names: Sequence[str], series: Sequence[Sequence[torch.Tensor]]) -> tuple[RawGram, ...]:
    """One RawGram per parameter tensor: `series` holds each tensor's rows, in the order of `names`."""
    return tuple(raw_gram(name, rows) for name, rows in zip(names, series, strict=True))


def spectra(grams: Sequence[RawGram], treatment: Treatment) -> tuple[LayerSpectrum, ...]:
    return tuple(spectrum(raw, treatment) for raw in grams)


def cross_entropy_with_weight_decay(model: nn.Module, weight_decay: float) -> Callable:
    """Cross-entropy + weight_decay / 2 * ||theta||^2. Its gradient, the loss's plus weight_decay * theta, is
    what the reference's SGD(weight_decay=5e-4) stepped on and, in its torch 1.4, left in p.grad (added in
    place), so it is the gradient the reference recorded."""
    if not weight_decay:
        return F.cross_entropy

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        penalty = sum(param.pow(2).sum() for param in model.parameters())
        return F.cross_entropy(outputs, targets) + 0.5 * weight_decay * penalty

    return loss


def record_epoch_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                           batch_size: int, lr: float, seed: int, progress: bool = True,
                           weight_decay: float = 0.0) -> GradientHistory:
    """Train `model` in place with minibatch SGD and keep each epoch's accumulated gradient.

    An epoch is len(labels) // batch_size steps over a fresh permutation (the
    last partial batch is dropped), which is the worker trainer's schedule, so
    the recorded gradient is exactly what a worker would upload after one epoch.
    (The reference records the mean of the minibatch gradients instead: a
    constant factor, which changes no count.)
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    names = [name for name, _ in model.named_parameters()]
    data = Examples(images, labels)
    task = Task(model=lambda: model, train_data=lambda _: data, loss=cross_entropy_with_weight_decay(model, weight_decay))
    trainer = LocalTrainer(task, model, data, seed=seed)
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
                                     settings.batch_size, settings.lr, settings.seed, progress, settings.weight_decay)
    accuracy = accuracy_and_loss(model, Examples(test.images, test.labels), batch_size=1000).accuracy
    grams = raw_grams(list(history.rows), list(history.rows.values()))
    return GradientSpaceReport(settings=settings, train_samples=count, epoch_losses=history.epoch_losses,
                               test_accuracy=accuracy, grams=grams, layers=spectra(grams, settings.treatment))


@dataclass(frozen=True)
class FederatedSettings:
    config: ExperimentConfig  # the federation, delta included (the CLI defaults it to 0: FedAvg)
    track_workers: int  # workers 1..track_workers keep their own series
    treatment: Treatment = field(default_factory=Treatment)


@dataclass(frozen=True)
class WorkerCounts:
    """One layer's final counts over the tracked workers: median and max of each."""

    name: str
    num_values: int
    n95_median: float
    n95_max: int
    n99_median: float
    n99_max: int
    rounds_max: int  # the most rounds a tracked worker took part in (every round when fraction = 1)


AGGREGATE, GLOBAL_UPDATE = "aggregate", "global_update"


def worker_series(worker_id: int) -> str:
    return f"worker_{worker_id}"


@dataclass(frozen=True)
class FederatedReport:
    """Series: AGGREGATE, the sample-weighted mean of all sampled workers' true gradients; GLOBAL_UPDATE,
    theta_t - theta_(t+1), what the server moved the model by; worker_series(k), tracked worker k's true
    gradient in the rounds it took part in."""

    settings: FederatedSettings
    grams: dict[str, tuple[RawGram, ...]]  # per series
    spectra: dict[str, tuple[LayerSpectrum, ...]]  # the grams treated as settings.treatment says
    test_accuracy: float  # of the final global model

    @property
    def aggregate(self) -> tuple[LayerSpectrum, ...]:
        return self.spectra[AGGREGATE]

    @property
    def global_update(self) -> tuple[LayerSpectrum, ...]:
        return self.spectra[GLOBAL_UPDATE]

    @property
    def workers(self) -> dict[int, tuple[LayerSpectrum, ...]]:
        return {int(name.removeprefix("worker_")): layers for name, layers in self.spectra.items()
                if name.startswith("worker_")}


def recounted(report: GradientSpaceReport | FederatedReport,
              treatment: Treatment) -> GradientSpaceReport | FederatedReport:
    """The same gradients counted under another treatment (no retraining)."""
    settings = dataclasses.replace(report.settings, treatment=treatment)
    if isinstance(report, FederatedReport):
        return dataclasses.replace(report, settings=settings, spectra=spectra_of_series(report.grams, treatment))
    return dataclasses.replace(report, settings=settings, layers=spectra(report.grams, treatment))


def spectra_of_series(grams: dict[str, tuple[RawGram, ...]],
                      treatment: Treatment) -> dict[str, tuple[LayerSpectrum, ...]]:
    return {name: spectra(series, treatment) for name, series in grams.items()}


class RoundRecorder:
    """simulate's observer: keeps the series the federated analysis counts components of.

    Per tracked worker its true gradient (before LBGM and any compressor); the weighted mean
    of every sampled worker's true gradient, which is exactly what the server aggregates when
    delta = 0 and no update is clipped; and the global update the workers receive. A series
    is a list of rows per parameter tensor, in the model's order.
    """

    def __init__(self, tracked: Sequence[int], rounds: int, progress: bool) -> None:
        self.workers: dict[int, list[list[torch.Tensor]]] = {k: [] for k in tracked}
        self.aggregate: list[list[torch.Tensor]] = []
        self.global_update: list[list[torch.Tensor]] = []
        self._bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not progress, dynamic_ncols=True)

    @staticmethod
    def _append(series: list[list[torch.Tensor]], tensors: Sequence[torch.Tensor]) -> None:
        if not series:
            series.extend([] for _ in tensors)
        for rows, tensor in zip(series, tensors, strict=True):
            rows.append(tensor.detach().reshape(-1).clone())

    def __call__(self, round_: RoundGradients) -> None:
        for worker_id, series in self.workers.items():
            if worker_id in round_.gradients:
                self._append(series, round_.gradients[worker_id])
        ids = sorted(round_.gradients)
        weights = aggregation_weights([round_.num_samples[k] for k in ids])
        self._append(self.aggregate, weighted_sum([round_.gradients[k] for k in ids], weights))
        self._append(self.global_update, [b - a for b, a in zip(round_.before, round_.after, strict=True)])
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def run_federated_analysis(settings: FederatedSettings, progress: bool = True) -> FederatedReport:
    """Run the federation in-process (lbgm.sim.federation), then N95/N99 per layer and round for each series."""
    config = settings.config
    if not 1 <= settings.track_workers <= config.workers:
        raise ValueError(f"track_workers must lie in [1, {config.workers}] (the workers), got {settings.track_workers}")
    recorder = RoundRecorder(range(1, settings.track_workers + 1), config.rounds, progress)
    try:
        result = simulate(config, evaluate_every_round=False, observe=recorder)
    finally:
        recorder.close()
    names = [name for name, _ in result.workers[1].trainer.model.named_parameters()]
    grams = {AGGREGATE: raw_grams(names, recorder.aggregate), GLOBAL_UPDATE: raw_grams(names, recorder.global_update),
             **{worker_series(k): raw_grams(names, series) for k, series in recorder.workers.items() if series}}
    return FederatedReport(settings=settings, grams=grams, spectra=spectra_of_series(grams, settings.treatment),
                           test_accuracy=float(result.rounds[-1].get("test_accuracy", float("nan"))))


def worker_counts(report: FederatedReport) -> tuple[WorkerCounts, ...]:
    """Per layer, the median and max over the tracked workers of their final N95 and N99."""
    per_worker = list(report.workers.values())
    summary = []
    for index, layer in enumerate(report.aggregate):
        finals = [spectra_of_worker[index] for spectra_of_worker in per_worker]
        n95 = [spectrum.n95[-1] for spectrum in finals]
        n99 = [spectrum.n99[-1] for spectrum in finals]
        summary.append(WorkerCounts(name=layer.name, num_values=layer.num_values,
                                    n95_median=statistics.median(n95), n95_max=max(n95),
                                    n99_median=statistics.median(n99), n99_max=max(n99),
                                    rounds_max=max(len(spectrum.n95) for spectrum in finals)))
    return tuple(summary)
