"""The worker's LBGM state and encoder: a stateful compressor over the
accumulated gradient that turns each decision unit into a scalar or a full
upload (lbgm.common.lookback holds the math)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from lbgm.common.lookback import LookbackGradient, Unit, decide, rebuild
from lbgm.common.wire import FullLayer, ScalarEntry


@dataclass(frozen=True)
class EncodedRound:
    full: list[FullLayer]
    scalars: list[ScalarEntry]
    new_lbgs: dict[int, LookbackGradient]  # installed by commit() once the server accepted the upload
    residuals: dict[int, tuple[torch.Tensor, ...]]  # what the server could not rebuild, per unit
    phase_errors: dict[int, float]


class LbgmEncoder:
    """Per-unit LBGs (and, with error feedback, residuals) of one worker.

    With error feedback the gradient that is decided on is g + residual, and
    the new residual is what the server will not see: (g + r) - rho * LBG for
    a scalar unit, the rounding of the wire dtype for a full one.
    """

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = list(units)
        self.lbgs: dict[int, LookbackGradient] = {}
        self.residuals: dict[int, tuple[torch.Tensor, ...]] = {}

    def encode(
        self,
        gradient: Sequence[torch.Tensor],
        round_number: int,
        delta: float,
        wire_dtype: torch.dtype,
        force_full: Collection[int] = (),
        error_feedback: bool = False,
    ) -> EncodedRound:
        """Decide every unit; nothing changes until commit()."""
        full: list[FullLayer] = []
        scalars: list[ScalarEntry] = []
        new_lbgs: dict[int, LookbackGradient] = {}
        residuals: dict[int, tuple[torch.Tensor, ...]] = {}
        errors: dict[int, float] = {}
        for index, unit in enumerate(self.units):
            parts = [gradient[layer] for layer in unit]
            if error_feedback and index in self.residuals:
                parts = [part + residual for part, residual in zip(parts, self.residuals[index])]
            lbg = None if index in force_full else self.lbgs.get(index)
            decision = decide(parts, lbg.tensors if lbg else None, delta)
            errors[index] = decision.phase_error
            if decision.send_scalar:
                scalars.append(ScalarEntry(unit=index, rho=decision.rho, lbg_version=lbg.version))
                seen = rebuild(lbg.tensors, decision.rho)
            else:
                sent = tuple(part.detach().to(wire_dtype, copy=True) for part in parts)
                new_lbgs[index] = LookbackGradient(tensors=sent, version=round_number)
                full.extend(FullLayer(layer, round_number, tensor) for layer, tensor in zip(unit, sent))
                seen = [tensor.to(torch.float32) for tensor in sent]
            if error_feedback:
                residuals[index] = tuple(part - server_view for part, server_view in zip(parts, seen))
        return EncodedRound(full=full, scalars=scalars, new_lbgs=new_lbgs, residuals=residuals, phase_errors=errors)

    def commit(self, encoded: EncodedRound) -> None:
        self.lbgs.update(encoded.new_lbgs)
        self.residuals.update(encoded.residuals)

    def keep_matching(self, server_versions: dict[int, int]) -> list[int]:
        """Drop every LBG the server does not hold at the same version; returns the dropped units."""
        dropped = [unit for unit, lbg in self.lbgs.items() if server_versions.get(unit) != lbg.version]
        for unit in dropped:
            del self.lbgs[unit]
        return dropped
