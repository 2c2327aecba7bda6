"""A base compressor's settings and the names of the compressors, without torch: the experiment
config checks them, and `lbgm run`'s launcher process checks a config without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

COMPRESSORS = ("none", "topk", "sign", "qsgd", "lowrank")


@dataclass(frozen=True)
class CompressorSettings:
    name: str = "none"
    topk_fraction: float = 0.1
    quantization_levels: int = 127
    lowrank_rank: int = 2
    memory: bool = True  # error feedback for the base compressor (GRACE's Memory)

    def __post_init__(self) -> None:
        if self.name not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {list(COMPRESSORS)}, got {self.name!r}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must lie in (0, 1], got {self.topk_fraction}")
        if not 1 <= self.quantization_levels <= 127:
            raise ValueError(f"quantization_levels must lie in [1, 127] (int8 payload), got {self.quantization_levels}")
        if self.lowrank_rank < 1:
            raise ValueError(f"lowrank_rank must be >= 1, got {self.lowrank_rank}")
