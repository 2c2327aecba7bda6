"""Judge one worker's upload against the model and that worker's mirrors.

Pure: given the parsed upload and the current mirror entries it returns the
rebuilt gradient and the mirror entries to install, or raises UpdateRejected.
Nothing is written here, which is what makes a refused upload change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lbgm.common.codec import enum_name
from lbgm.common.compressors import PayloadError, decode
from lbgm.common.lookback import LookbackGradient, RebuiltGradient, Unit, all_finite, rebuild_is_finite
from lbgm.common.wire import ReceivedUpdate
from lbgm.v1 import lbgm_pb2 as pb


class UpdateRejected(Exception):
    """An upload that must not touch any state; `reason` tells the worker why."""

    def __init__(self, reason: int, message: str, stale_units: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.stale_units = list(stale_units)


@dataclass(frozen=True)
class UploadRules:
    """What the server expects of every upload in this run."""

    layer_shapes: tuple[tuple[int, ...], ...]
    units: tuple[Unit, ...]
    dense_dtype: torch.dtype  # dtype of every DENSE payload, with or without a compressor (the run's wire dtype)
    codec: int  # the run's base compressor; DENSE is always accepted too
    buffer_specs: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()  # model buffers to average


@dataclass(frozen=True)
class AcceptedUpdate:
    gradient: RebuiltGradient  # float32 when read, one per layer: decoded full payload or rho * LBG
    new_mirrors: dict[int, LookbackGradient]
    buffers: list[torch.Tensor]
    num_samples: int
    train_loss: float
    full_units: int
    scalar_units: int
    floats_uploaded: int  # payload elements plus one per scalar (the paper's "parameters shared")


def decode_full_layers(update: ReceivedUpdate, round_number: int, rules: UploadRules) -> dict[int, torch.Tensor]:
    """Each full layer decoded and checked (range, version, codec, dtype, shape, NaN/Inf): the part of
    judging that reads every payload byte and needs no mirror, so a server can run it for many uploads
    at once before it takes its lock (Coordinator.submit) and hand the result to judge_update."""
    malformed = pb.ErrorDetail.MALFORMED
    decoded = {}
    for item in update.full:
        if not 0 <= item.layer < len(rules.layer_shapes):
            raise UpdateRejected(malformed, f"layer {item.layer} out of range [0, {len(rules.layer_shapes)})")
        if item.layer in decoded:
            raise UpdateRejected(malformed, f"layer {item.layer} sent twice")
        if item.lbg_version != round_number:
            raise UpdateRejected(malformed, f"layer {item.layer} carries LBG version {item.lbg_version}, "
                                            f"expected the round {round_number}")
        if item.codec not in (pb.DENSE, rules.codec):
            raise UpdateRejected(malformed, f"layer {item.layer} uses codec {enum_name(pb.Codec, item.codec)}, "
                                            f"this run accepts {enum_name(pb.Codec, rules.codec)} or DENSE")
        if item.codec == pb.DENSE and item.parts and item.parts[0].dtype != rules.dense_dtype:
            raise UpdateRejected(malformed, f"layer {item.layer} has dtype {item.parts[0].dtype}, "
                                            f"expected {rules.dense_dtype}")
        try:
            tensor = decode(item.codec, item.parts, rules.layer_shapes[item.layer])
        except PayloadError as error:
            raise UpdateRejected(malformed, f"layer {item.layer}: {error}") from None
        if not all_finite(tensor):
            raise UpdateRejected(malformed, f"layer {item.layer} contains NaN or Inf")
        decoded[item.layer] = tensor
    return decoded


def _checked_buffers(update: ReceivedUpdate, rules: UploadRules) -> list[torch.Tensor]:
    malformed = pb.ErrorDetail.MALFORMED
    if sorted(update.buffers) != list(range(len(rules.buffer_specs))):
        raise UpdateRejected(malformed, f"expected model buffers 0..{len(rules.buffer_specs) - 1}, "
                                        f"got {sorted(update.buffers)}")
    for index, (shape, dtype) in enumerate(rules.buffer_specs):
        buffer = update.buffers[index]
        if tuple(buffer.shape) != shape or buffer.dtype != dtype:
            raise UpdateRejected(malformed, f"buffer {index} is {buffer.dtype}{list(buffer.shape)}, "
                                            f"expected {dtype}{list(shape)}")
        if buffer.is_floating_point() and not all_finite(buffer):
            raise UpdateRejected(malformed, f"buffer {index} contains NaN or Inf")
    return [update.buffers[index] for index in range(len(rules.buffer_specs))]


def judge_update(
    update: ReceivedUpdate,
    round_number: int,
    rules: UploadRules,
    mirrors: dict[int, LookbackGradient],
    decoded: dict[int, torch.Tensor] | None = None,
) -> AcceptedUpdate:
    """Check every rule of the protocol; rebuild the gradient if all hold. `decoded`: what
    decode_full_layers(update, round_number, rules) returned, if it ran already."""
    malformed = pb.ErrorDetail.MALFORMED
    if update.header.num_samples == 0:
        raise UpdateRejected(malformed, "num_samples must be positive")
    if not math.isfinite(update.header.train_loss):
        raise UpdateRejected(malformed, f"train_loss is not finite: {update.header.train_loss}")
    full_by_layer = decode_full_layers(update, round_number, rules) if decoded is None else decoded
    payload_sizes = {item.layer: sum(part.numel() for part in item.parts) for item in update.full}
    buffers = _checked_buffers(update, rules)
    units = rules.units

    scalar_by_unit = {}
    for entry in update.scalars:
        if not 0 <= entry.unit < len(units):
            raise UpdateRejected(malformed, f"scalar for unit {entry.unit} out of range [0, {len(units)})")
        if entry.unit in scalar_by_unit:
            raise UpdateRejected(malformed, f"unit {entry.unit} has two scalars")
        if not math.isfinite(entry.rho):
            raise UpdateRejected(malformed, f"rho for unit {entry.unit} is not finite: {entry.rho}")
        scalar_by_unit[entry.unit] = entry

    terms: dict[int, tuple[torch.Tensor, float | None]] = {}  # layer -> (payload or LBG, rho or None)
    new_mirrors: dict[int, LookbackGradient] = {}
    stale: list[int] = []
    floats = 0
    for unit_index, unit in enumerate(units):
        sent_full = [layer in full_by_layer for layer in unit]
        scalar = scalar_by_unit.get(unit_index)
        if all(sent_full) and scalar is None:
            tensors = tuple(full_by_layer[layer] for layer in unit)
            new_mirrors[unit_index] = LookbackGradient(tensors=tensors, version=round_number)
            for layer, tensor in zip(unit, tensors):
                terms[layer] = (tensor, None)
                floats += payload_sizes[layer]
        elif not any(sent_full) and scalar is not None:
            mirror = mirrors.get(unit_index)
            if mirror is None or mirror.version != scalar.lbg_version:
                stale.append(unit_index)
                continue
            if not rebuild_is_finite(mirror.tensors, scalar.rho):
                raise UpdateRejected(malformed, f"rho {scalar.rho} for unit {unit_index} overflows its LBG to Inf")
            for layer, lbg in zip(unit, mirror.tensors):
                terms[layer] = (lbg, scalar.rho)
            floats += 1
        else:
            raise UpdateRejected(
                malformed,
                f"unit {unit_index} (layers {list(unit)}) must come either fully as FullGradient or as one scalar",
            )
    if stale:
        held = {unit: mirrors[unit].version if unit in mirrors else 0 for unit in stale}
        raise UpdateRejected(
            pb.ErrorDetail.STALE_LBG,
            f"scalar updates name LBG versions the server does not hold for units {stale} "
            f"(server holds versions {held}; 0 = none); resend those units in full",
            stale_units=stale,
        )
    ordered = [terms[layer] for layer in range(len(rules.layer_shapes))]  # the units cover every layer
    return AcceptedUpdate(
        gradient=RebuiltGradient(sources=tuple(t for t, _ in ordered), factors=tuple(f for _, f in ordered)),
        new_mirrors=new_mirrors,
        buffers=buffers,
        num_samples=int(update.header.num_samples),
        train_loss=float(update.header.train_loss),
        full_units=len(new_mirrors),
        scalar_units=len(scalar_by_unit),
        floats_uploaded=floats,
    )
