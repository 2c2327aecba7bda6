"""Tensor state on disk: LBG sets and models, written atomically.

A crash mid-write leaves the previous file intact (write to a temporary
file, fsync, rename). Files are loaded with `weights_only=True`, so they can
hold only tensors and plain containers, never arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lbgm.common.lookback import LookbackGradient


def save_atomic(path: Path, state: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load(path: Path) -> object:
    return torch.load(path, weights_only=True)


def lbgs_to_state(lbgs: dict[int, LookbackGradient]) -> dict[int, dict]:
    return {unit: {"version": lbg.version, "tensors": list(lbg.tensors)} for unit, lbg in lbgs.items()}


def lbgs_from_state(state: dict[int, dict]) -> dict[int, LookbackGradient]:
    return {int(unit): LookbackGradient(tuple(entry["tensors"]), int(entry["version"])) for unit, entry in state.items()}
