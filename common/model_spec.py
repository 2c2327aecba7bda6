"""What a model looks like on the wire: its parameters and buffers by name, shape and dtype.

A worker sends the description of its own model with its Join; the server compares it with its
own (from the task's model, or from a weights file) and refuses a join that differs, naming every
difference, before the worker takes a slot. Upload rules (lbgm.server.updates) derive from the
same description, so the server never needs the model's class."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lbgm.v1 import lbgm_pb2 as pb


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", ...
    buffer: bool  # a buffer (e.g. BatchNorm statistics) rather than a trained parameter

    def __str__(self) -> str:
        kind = "buffer" if self.buffer else "parameter"
        return f"{kind} {self.name} {self.dtype}{list(self.shape)}"

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self}: {self.dtype!r} is not a torch dtype")
        return dtype

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, shape=self.shape, dtype=self.dtype, buffer=self.buffer)

    @classmethod
    def from_proto(cls, message: pb.TensorSpec) -> TensorSpec:
        return cls(message.name, tuple(message.shape), message.dtype, message.buffer)


def describe_tensor(name: str, tensor: torch.Tensor, buffer: bool) -> TensorSpec:
    return TensorSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), buffer)


def describe_model(model: nn.Module) -> list[TensorSpec]:
    """Parameters, then buffers, in the order they travel."""
    return [describe_tensor(name, t, buffer)
            for buffer, named in ((False, model.named_parameters()), (True, model.named_buffers()))
            for name, t in named]


def specs_to_proto(specs: Sequence[TensorSpec]) -> list[pb.TensorSpec]:
    return [spec.to_proto() for spec in specs]


def specs_from_proto(messages: Sequence[pb.TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec.from_proto(message) for message in messages]


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
