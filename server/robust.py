"""Robust aggregation: no single worker may destroy the global model.

Two defences, both pure functions over tensors (no I/O, no gRPC), shared by the
server and the in-process simulation so both apply the same rule:

1. Norm bound. A layer of an update whose norm exceeds `factor` times the
   median norm of that layer over the round's updates is scaled down to that
   median: it still counts, as one typical update in its own direction. The
   (lower) median of n norms is an honest norm as long as fewer than half of
   the updates are hostile, so one worker among three or more cannot move a
   layer by more than an honest-sized step by sending huge values. Scaling an
   outlier to the bound instead would hand it `factor` honest steps: in the
   default job one all-1e30 upload clipped to 10x the median still took
   accuracy after 50 rounds from 0.889 to 0.69; scaled to the median, 0.883.
   Honest updates of one round have norms of one order of magnitude (each is a
   gradient of the same model: at most 1.6x the median in the default job,
   3.5x with 3 classes per worker), so with a generous factor they are left
   alone and the LBGM and delta = 0 results do not change: an update that is
   not scaled is passed on as the very same object, bit for bit. With fewer
   than MIN_UPDATES_TO_BOUND updates a median cannot tell the hostile norm from
   the honest one, and nothing is scaled; the round guard below still holds.
   Per layer rather than per update: a whole-update bound lets an attacker pour
   its whole budget into one small layer (an output bias).
2. Round guard. A round whose candidate model holds NaN/Inf, or whose test loss
   is not finite or jumps to more than `ratio` times the previous round's *and*
   more than LOSS_JUMP_FLOOR nats above it, is refused: the previous model is
   kept. The ratio alone would refuse harmless moves of a nearly-zero loss
   (0.01 -> 0.03); the floor alone would refuse an early, large but sane step.

What this does not stop: a coordinated majority (it owns the median), and
updates that stay just under the bound but are biased in the same direction
round after round: each moves the model by up to `factor / n` of an honest
step (at 10x in the default job that is the 0.69 above, after which the guard
refuses every round: the model is kept, but training stalls).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lbgm.common.lookback import (
    RebuiltGradient, aggregation_weights, all_finite, average_buffers, server_sgd_step, weighted_sum,
)

MIN_UPDATES_TO_BOUND = 3  # the smallest round in which one hostile norm cannot be the median
LOSS_JUMP_FLOOR = 1.0  # nats: a refused round's test loss rose by more than this (and by `ratio`)


def tensor_norm(tensor: torch.Tensor) -> float:
    """Euclidean norm in float64: a float32 sum of squares overflows from entries of about 1e19."""
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def layer_norms(update: Sequence[torch.Tensor]) -> list[float]:
    """The norm of each layer of an update. For a RebuiltGradient, ||rho * LBG|| = |rho| * ||LBG||:
    the product is never built (up to float32 rounding of the product, which is far below any bound)."""
    if isinstance(update, RebuiltGradient):
        return [tensor_norm(source) * (1.0 if rho is None else abs(rho))
                for source, rho in zip(update.sources, update.factors, strict=True)]
    return [tensor_norm(layer) for layer in update]


def median_norms(norms: Sequence[Sequence[float]], factor: float) -> list[float] | None:
    """Per layer, the lower median of that layer's norm over the updates (norms[update][layer]);
    None when nothing is bounded (factor 0, or fewer than MIN_UPDATES_TO_BOUND updates)."""
    if factor < 0 or not math.isfinite(factor):
        raise ValueError(f"the norm bound factor must be finite and >= 0, got {factor}")
    if factor == 0 or len(norms) < MIN_UPDATES_TO_BOUND:
        return None
    return [sorted(column)[(len(column) - 1) // 2] for column in zip(*norms, strict=True)]


@dataclass(frozen=True)
class ScaledGradient(Sequence[torch.Tensor]):
    """An update whose layer i reads as scales[i] * update[i], in float32.

    The product is taken in float64: the scale of a 1e30-valued layer is far below
    float32's normal range, and its entries times the scale are ordinary numbers."""

    update: Sequence[torch.Tensor]
    scales: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.update)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]  # no slices
        layer = self.update[index]
        scale = self.scales[index]
        if scale == 1.0:
            return layer.to(torch.float32)
        return (layer.to(torch.float64) * scale).to(torch.float32)


@dataclass(frozen=True)
class BoundedUpdates:
    updates: list[Sequence[torch.Tensor]]  # unclipped updates are the objects given, unchanged
    clipped_updates: int  # updates with at least one layer scaled down to the median
    clipped_layers: int


def bound_updates(updates: Sequence[Sequence[torch.Tensor]], factor: float) -> BoundedUpdates:
    """Scale every layer whose norm exceeds `factor` times its median (see median_norms) down to the median."""
    norms = [layer_norms(update) for update in updates]
    medians = median_norms(norms, factor)
    if medians is None:
        return BoundedUpdates(list(updates), 0, 0)
    bounded: list[Sequence[torch.Tensor]] = []
    clipped_updates = clipped_layers = 0
    for update, update_norms in zip(updates, norms):
        scales = tuple(median / norm if norm > factor * median else 1.0 for norm, median in zip(update_norms, medians))
        clipped = sum(scale < 1.0 for scale in scales)
        bounded.append(ScaledGradient(update, scales) if clipped else update)
        clipped_updates += clipped > 0
        clipped_layers += clipped
    return BoundedUpdates(bounded, clipped_updates, clipped_layers)


def refusal_reason(candidate: Sequence[torch.Tensor], loss: float | None, previous_loss: float,
                   ratio: float) -> str | None:
    """Why a round's candidate model must not replace the previous one, or None if it may.

    `candidate` is every tensor of the new state (parameters, velocity, buffers);
    `loss` is its test loss (None: the task has no central evaluation, only finiteness
    is checked); `previous_loss` is the test loss of the model kept so far (NaN if
    unknown: then the jump is not checked); ratio 0 turns the loss-jump test off."""
    for index, tensor in enumerate(candidate):
        if tensor.is_floating_point() and not all_finite(tensor):
            return f"the new model's tensor {index} holds NaN or Inf"
    if loss is None:
        return None
    if not math.isfinite(loss):
        return f"the new model's test loss is {loss}"
    if ratio > 0 and math.isfinite(previous_loss) and loss > ratio * previous_loss and loss > previous_loss + LOSS_JUMP_FLOOR:
        return (f"the test loss would jump from {previous_loss:.4f} to {loss:.4f} (more than {ratio:g}x and "
                f"+{LOSS_JUMP_FLOOR:g})")
    return None


@dataclass(frozen=True)
class GlobalModel:
    """The server's model state and its test figures."""

    params: list[torch.Tensor]
    velocity: list[torch.Tensor] | None
    buffers: list[torch.Tensor]
    accuracy: float
    loss: float


@dataclass(frozen=True)
class RoundOutcome:
    model: GlobalModel  # the candidate, or the previous model when refused
    clipped_updates: int
    clipped_layers: int
    refusal: str | None  # why the candidate was refused; None if applied
    candidate_loss: float  # the test loss of the candidate, applied or not


@dataclass(frozen=True)
class RobustRule:
    norm_bound: float  # layers beyond this many times their median norm are scaled to the median; 0 = off
    loss_ratio: float  # refuse rounds whose test loss jumps beyond this ratio (and the floor); 0 = off


def aggregate_round(
    previous: GlobalModel,
    gradients: Sequence[Sequence[torch.Tensor]],
    buffers: Sequence[Sequence[torch.Tensor]],
    num_samples: Sequence[int],
    rule: RobustRule,
    lr: float,
    momentum: float,
    evaluate: Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[float, float]] | None,
) -> RoundOutcome:
    """One round on the server: bound, average, step, evaluate, then keep the result or the previous model.

    `evaluate(params, buffers)` returns (test accuracy, test loss); None: the task has no central
    evaluation (the figures are NaN and only the model's finiteness is checked)."""
    weights = aggregation_weights(num_samples)
    bounded = bound_updates(gradients, rule.norm_bound)
    params, velocity = server_sgd_step(previous.params, weighted_sum(bounded.updates, weights), previous.velocity,
                                       lr, momentum)
    new_buffers = average_buffers(buffers, weights) if previous.buffers else previous.buffers
    accuracy, loss = evaluate(params, new_buffers) if evaluate is not None else (math.nan, math.nan)
    refusal = refusal_reason([*params, *(velocity or ()), *new_buffers], loss if evaluate is not None else None,
                             previous.loss, rule.loss_ratio)
    model = previous if refusal else GlobalModel(params, velocity, new_buffers, accuracy, loss)
    return RoundOutcome(model, bounded.clipped_updates, bounded.clipped_layers, refusal, loss)
