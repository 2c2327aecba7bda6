"""The worker's LBGM state and encoder.

Per round and layer: x = g + memory; the base compressor C (none, top-k,
sign, QSGD, low rank) turns x into a payload whose decoded form g~ = C(x) is
what the server would rebuild. LBGM then decides per unit on g~: a scalar
rho against the unit's look-back gradient, or the payload in full (g~
becomes the new LBG on both sides, bit-identical because both decode the same
bytes). The math lives in lbgm.common.lookback and lbgm.common.compressors.

Devices: the gradient arrives on the worker's device (--device), and the
compressor, rho and the phase error are computed there, against a device copy
of the LBG. What the encoder keeps as an LBG is the CPU tensor decoded from
the payload that travels, by the function the server decodes it with, so the
mirrors stay bit-identical whatever device a worker computes on. The
error-feedback memory and PowerSGD's warm starts never travel and stay on the
device.

Error feedback keeps one memory per layer holding what the server has not
seen: the compressor's loss x - g~ (if `compressor_memory`) plus LBGM's loss
g~ - rho * LBG (if `error_feedback`), so each lost piece is carried once.
Nothing changes until commit(), which the worker calls only once the server
accepted the upload. state() and restore() take the encoder back to an earlier
round, as a server that resumed from a checkpoint holds it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from lbgm.common.compressors import CODEC_OF, CompressorSettings, compress
from lbgm.common.lookback import LookbackGradient, Unit, decide, rebuild
from lbgm.common.wire import FullLayer, ScalarEntry
from lbgm.v1 import lbgm_pb2 as pb


@dataclass(frozen=True)
class CompressedLayer:
    full: FullLayer  # what would travel if the layer's unit goes in full
    decoded: torch.Tensor  # g~: the server's reconstruction of that payload, on the CPU (the LBG if it travels)
    on_device: torch.Tensor  # g~ on the gradient's device, for the decision and the memory
    warm_q: torch.Tensor | None


@dataclass(frozen=True)
class EncoderState:
    """Everything the encoder carries from one round to the next. Shallow: the encoder replaces
    tensors and never edits one in place, so a state shares every tensor that did not change."""

    lbgs: dict[int, LookbackGradient]
    memory: dict[int, torch.Tensor]
    warm_q: dict[int, torch.Tensor]
    random_state: torch.Tensor  # the compressors' generator (QSGD's stochastic rounding, PowerSGD's start)


@dataclass(frozen=True)
class EncodedRound:
    full: list[FullLayer]
    scalars: list[ScalarEntry]
    new_lbgs: dict[int, LookbackGradient]
    memory: dict[int, torch.Tensor]  # per layer, installed by commit()
    warm_q: dict[int, torch.Tensor]
    phase_errors: dict[int, float]


class LbgmEncoder:
    def __init__(self, units: Sequence[Unit], compressor: CompressorSettings = CompressorSettings(),
                 seed: int = 0) -> None:
        self.units = list(units)
        self.compressor = compressor
        self.lbgs: dict[int, LookbackGradient] = {}
        self.memory: dict[int, torch.Tensor] = {}
        self.warm_q: dict[int, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def _compress(self, layer: int, x: torch.Tensor, round_number: int, wire_dtype: torch.dtype) -> CompressedLayer:
        result = compress(self.compressor, x, self.warm_q.get(layer), self._generator, wire_dtype)
        return CompressedLayer(FullLayer(layer, round_number, result.codec, result.parts), result.decoded,
                               result.decoded.to(x.device), result.lowrank_q)

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
        inputs = [g + self.memory[i] if i in self.memory else g for i, g in enumerate(gradient)]
        layers = [self._compress(i, x, round_number, wire_dtype) for i, x in enumerate(inputs)]
        compressor_memory = self.compressor.memory and self.compressor.name != "none"
        full: list[FullLayer] = []
        scalars: list[ScalarEntry] = []
        new_lbgs: dict[int, LookbackGradient] = {}
        memory: dict[int, torch.Tensor] = {}
        errors: dict[int, float] = {}
        for index, unit in enumerate(self.units):
            decoded = [layers[layer].on_device for layer in unit]
            lbg = None if index in force_full else self.lbgs.get(index)
            lbg_here = [part.to(d.device) for part, d in zip(lbg.tensors, decoded, strict=True)] if lbg else None
            decision = decide(decoded, lbg_here, delta)
            errors[index] = decision.phase_error
            if decision.send_scalar:
                scalars.append(ScalarEntry(unit=index, rho=decision.rho, lbg_version=lbg.version))
                server_view = rebuild(lbg_here, decision.rho)
            else:
                new_lbgs[index] = LookbackGradient(tensors=tuple(layers[layer].decoded for layer in unit),
                                                   version=round_number)
                full.extend(layers[layer].full for layer in unit)
                server_view = [d.to(torch.float32) for d in decoded]
            if not (compressor_memory or error_feedback):
                continue
            for layer, seen in zip(unit, server_view):
                carried = torch.zeros_like(inputs[layer])
                if compressor_memory:
                    carried += inputs[layer] - layers[layer].on_device
                if error_feedback:
                    carried += layers[layer].on_device.to(torch.float32) - seen
                memory[layer] = carried
        warm_q = {i: layer.warm_q for i, layer in enumerate(layers) if layer.warm_q is not None}
        return EncodedRound(full=full, scalars=scalars, new_lbgs=new_lbgs, memory=memory, warm_q=warm_q,
                            phase_errors=errors)

    def commit(self, encoded: EncodedRound) -> None:
        self.lbgs.update(encoded.new_lbgs)
        self.memory.update(encoded.memory)
        self.warm_q.update(encoded.warm_q)

    def state(self) -> EncoderState:
        return EncoderState(dict(self.lbgs), dict(self.memory), dict(self.warm_q), self._generator.get_state())

    def restore(self, state: EncoderState) -> None:
        self.lbgs, self.memory, self.warm_q = dict(state.lbgs), dict(state.memory), dict(state.warm_q)
        self._generator.set_state(state.random_state)

    def keep_matching(self, server_versions: dict[int, int]) -> list[int]:
        """Drop every LBG the server does not hold at the same version; returns the dropped units."""
        dropped = [unit for unit, lbg in self.lbgs.items() if server_versions.get(unit) != lbg.version]
        for unit in dropped:
            del self.lbgs[unit]
        return dropped


def compressor_settings(settings: pb.TrainSettings) -> CompressorSettings:
    """The base compressor a round's settings ask for."""
    names = {codec: name for name, codec in CODEC_OF.items()}
    return CompressorSettings(name=names[settings.codec], topk_fraction=settings.topk_fraction or 0.1,
                              quantization_levels=settings.quantization_levels or 127,
                              lowrank_rank=settings.lowrank_rank or 2, memory=settings.compressor_memory)
