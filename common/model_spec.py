"""What a model looks like on the wire: its parameters and buffers by name, shape and dtype.

The server sends this description at join; a worker whose own model differs stops there and
names the difference, instead of failing on its first upload."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", ...
    buffer: bool  # a buffer (e.g. BatchNorm statistics) rather than a trained parameter

    def __str__(self) -> str:
        kind = "buffer" if self.buffer else "parameter"
        return f"{kind} {self.name} {self.dtype}{list(self.shape)}"


def describe_model(model: nn.Module) -> list[TensorSpec]:
    """Parameters, then buffers, in the order they travel."""
    return [TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), buffer)
            for buffer, named in ((False, model.named_parameters()), (True, model.named_buffers()))
            for name, t in named]


def fingerprint(specs: Sequence[TensorSpec]) -> str:
    """Hash of the description: server and worker must agree on it."""
    text = ";".join(f"{'b' if s.buffer else 'p'}:{s.name}:{s.shape}:{s.dtype}" for s in specs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_differences(expected: Sequence[TensorSpec], actual: Sequence[TensorSpec], limit: int = 5) -> list[str]:
    """How `actual` differs from `expected`, tensor by tensor (at most `limit` lines, then a count)."""
    differences = [f"tensor {index}: expected {want}, got {got}"
                   for index, (want, got) in enumerate(zip(expected, actual)) if want != got]
    if len(expected) != len(actual):
        differences.append(f"expected {len(expected)} tensors, got {len(actual)}")
    if len(differences) > limit:
        differences = [*differences[:limit], f"and {len(differences) - limit} more"]
    return differences
