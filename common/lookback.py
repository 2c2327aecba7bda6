"""The LBGM algorithm as pure functions over tensors (no I/O, no gRPC).

Azam et al., "Recycling Model Updates in Federated Learning: Are Gradient
Subspaces Low-Rank?", ICLR 2022. For each decision unit (one parameter tensor,
or the whole model flattened) a worker compares its new accumulated gradient
g with the look-back gradient (LBG) it last sent in full:

    rho = <g, LBG> / <LBG, LBG>                 look-back coefficient (LBC)
    err = 1 - cos^2(g, LBG) = sin^2(angle)      look-back phase error, in [0, 1]

If err <= delta the worker sends only rho and the server rebuilds rho * LBG
from its own copy of that LBG; otherwise it sends g in full and g becomes the
new LBG on both sides. delta = 0 turns the look-back off entirely (every unit
goes in full), which makes it the FedAvg baseline through the same code path.

Every function here is shared by the worker, the server and the in-process
simulation, so all three compute bit-for-bit the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Unit = tuple[int, ...]  # indices of the parameter tensors one decision covers


@dataclass(frozen=True)
class LookbackGradient:
    """An LBG as both sides hold it: bit-identical on worker and server."""

    tensors: tuple[torch.Tensor, ...]  # in the precision it travelled in, one per layer of its unit
    version: int  # round in which it travelled


@dataclass(frozen=True)
class LookbackDecision:
    """Outcome of the LBGM test for one unit."""

    send_scalar: bool
    rho: float  # exactly representable in float32: the value that travels
    phase_error: float  # sin^2 of the angle between g and the LBG, in [0, 1]


def decision_units(num_layers: int, granularity: str) -> list[Unit]:
    """Decision units: one per parameter tensor ("layer") or one for all ("model")."""
    if granularity == "layer":
        return [(index,) for index in range(num_layers)]
    if granularity == "model":
        return [tuple(range(num_layers))]
    raise ValueError(f"granularity must be 'layer' or 'model', got {granularity!r}")


def to_float32(value: float) -> float:
    """Round a Python float to the nearest float32 (inf when out of range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor flat in float64, on its own device; Apple's MPS has no float64, so there on the CPU."""
    return (tensor.cpu() if tensor.device.type == "mps" else tensor).reshape(-1).double()


def _dot(left: Sequence[torch.Tensor], right: Sequence[torch.Tensor]) -> float:
    # float64 accumulation: the decision must not hinge on float32 round-off.
    return math.fsum(float(torch.dot(_float64(a), _float64(b))) for a, b in zip(left, right, strict=True))


def lookback_coefficient(grad: Sequence[torch.Tensor], lbg: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(rho, phase error) of grad against lbg, both given as lists of tensors.

    Edge cases, chosen so nothing is ever NaN: a zero gradient is exactly
    rho = 0 times any LBG (error 0); a zero LBG cannot represent a non-zero
    gradient (rho 0, error 1).
    """
    grad_sq = _dot(grad, grad)
    lbg_sq = _dot(lbg, lbg)
    if grad_sq == 0.0:
        return 0.0, 0.0
    if lbg_sq == 0.0:
        return 0.0, 1.0
    cross = _dot(grad, lbg)
    rho = cross / lbg_sq
    cos_sq = (cross * cross) / (grad_sq * lbg_sq)
    return rho, min(1.0, max(0.0, 1.0 - cos_sq))


def decide(grad: Sequence[torch.Tensor], lbg: Sequence[torch.Tensor] | None, delta: float) -> LookbackDecision:
    """The LBGM test for one unit. `lbg` is None when no LBG exists yet."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")
    if lbg is None or delta == 0.0:
        return LookbackDecision(send_scalar=False, rho=0.0, phase_error=1.0)
    rho, error = lookback_coefficient(grad, lbg)
    rho32 = to_float32(rho)
    if not (math.isfinite(rho32) and math.isfinite(error)):
        return LookbackDecision(send_scalar=False, rho=0.0, phase_error=1.0)
    return LookbackDecision(send_scalar=error <= delta, rho=rho32, phase_error=error)


def rebuild(lbg: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """rho * LBG in float32: what the server aggregates for a scalar update."""
    factor = torch.tensor(rho, dtype=torch.float32)
    return [part.to(torch.float32) * factor for part in lbg]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf.

    One reduction pass: aminmax propagates NaN, and an Inf is an extreme.
    torch.isfinite(t).all() builds a mask first and is about 16x slower
    (bench.profile); the server runs this on every uploaded layer.
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def rebuild_is_finite(lbg: Sequence[torch.Tensor], rho: float) -> bool:
    """Whether rebuild(lbg, rho) is free of Inf, without building it.

    For finite LBG entries, float32 x -> x * rho is monotone and so is its
    rounding, so the product overflows somewhere only if it overflows at a
    layer's smallest or largest entry: two products per layer, not a copy.
    """
    for part in lbg:
        if part.numel() == 0:
            continue
        low, high = torch.aminmax(part)
        if not all_finite(rebuild((torch.stack((low, high)),), rho)[0]):
            return False
    return True


@dataclass(frozen=True)
class RebuiltGradient(Sequence[torch.Tensor]):
    """The float32 gradient one upload stands for, made one layer at a time when read.

    A layer sent in full is its payload (converted to float32 when read); a
    layer sent as a scalar is rho times the sender's LBG, multiplied when
    read. Holding payloads and factors instead of products is what keeps a
    server collecting K uploads at its mirrors plus one layer, not K extra
    model copies: each product lives only while the aggregation adds it.
    """

    sources: tuple[torch.Tensor, ...]  # per layer: the received payload or the LBG tensor
    factors: tuple[float | None, ...]  # per layer: rho, or None for a payload taken as it came

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]  # no slices
        rho = self.factors[index]
        if rho is None:
            return self.sources[index].to(torch.float32)
        return rebuild((self.sources[index],), rho)[0]


def aggregation_weights(num_samples: Sequence[int]) -> list[float]:
    """w_k = n_k / sum of n over the round's participants."""
    total = sum(num_samples)
    if total <= 0 or any(n <= 0 for n in num_samples):
        raise ValueError(f"every participant needs a positive sample count, got {list(num_samples)}")
    return [n / total for n in num_samples]


def weighted_sum(updates: Sequence[Iterable[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    """sum_k w_k * updates[k], layer by layer, in the order given.

    Each update is read once, layer by layer, so a RebuiltGradient's
    products exist one at a time.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    total: list[torch.Tensor] = []
    for position, (update, weight) in enumerate(zip(updates, weights)):
        layers = 0
        for layers, layer in enumerate(update, start=1):
            if position == 0:
                total.append(torch.zeros_like(layer, dtype=torch.float32))
            elif layers > len(total):
                raise ValueError(f"update {position} has more layers than the first ({len(total)})")
            total[layers - 1].add_(layer.to(torch.float32), alpha=weight)
        if layers != len(total):
            raise ValueError(f"update {position} has {layers} layers, the first has {len(total)}")
    return total


def server_sgd_step(
    params: Sequence[torch.Tensor],
    update: Sequence[torch.Tensor],
    velocity: Sequence[torch.Tensor] | None,
    lr: float,
    momentum: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """One server optimizer step on the aggregated gradient (PyTorch SGD semantics).

    v <- momentum * v + g (v starts at g); theta <- theta - lr * v. With
    momentum 0 and lr equal to the local lr this is exactly FedAvg.
    """
    if momentum == 0.0:
        return [p - lr * g for p, g in zip(params, update, strict=True)], None
    if velocity is None:
        new_velocity = [g.clone() for g in update]
    else:
        new_velocity = [momentum * v + g for v, g in zip(velocity, update, strict=True)]
    return [p - lr * v for p, v in zip(params, new_velocity, strict=True)], new_velocity


def average_buffers(buffers: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    """Model buffers of the participants, combined: float buffers (BatchNorm running
    mean/var) weighted like the gradients, counters (num_batches_tracked) by maximum."""
    combined = []
    for parts in zip(*buffers, strict=True):
        if parts[0].is_floating_point():
            combined.append(sum((w * p for w, p in zip(weights, parts)), torch.zeros_like(parts[0])))
        else:
            combined.append(torch.stack(list(parts)).max(dim=0).values)
    return combined
