"""A model as tensors only: its description and values, and the initial weights file.

The server needs no model class: it holds a `ModelState` (parameters and buffers with their
names, shapes and dtypes), built either from a task's model or from a weights file that
`lbgm init-weights` wrote from one. The file is safetensors (a JSON header and raw tensor bytes,
no code): every parameter and buffer under its state-dict name, and in the header's metadata
what safetensors itself does not keep: the parameter order (the LBGM layer order) and which
tensors are buffers.

    metadata["lbgm_format"]      "1"
    metadata["lbgm_parameters"]  JSON list of parameter names, in the model's parameter order
    metadata["lbgm_buffers"]     JSON list of buffer names, in the model's buffer order
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lbgm.common.model_spec import TensorSpec, describe_model, describe_tensor

WEIGHTS_FORMAT = "1"
FORMAT_KEY, PARAMETERS_KEY, BUFFERS_KEY = "lbgm_format", "lbgm_parameters", "lbgm_buffers"
HOW_TO_WRITE = "write one with `lbgm init-weights --task REFERENCE --out FILE` (docs/TASKS.md)"


class WeightsError(ValueError):
    """A weights file that is missing, not safetensors, or without consistent lbgm metadata."""


@dataclass(frozen=True)
class ModelState:
    """Parameters then buffers, as they travel, with their description (same order)."""

    tensors: tuple[TensorSpec, ...]
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]

    @classmethod
    def of_model(cls, model: nn.Module) -> ModelState:
        """CPU copies of the model's tensors, wherever it lives."""
        return cls(tuple(describe_model(model)), [p.detach().to("cpu", copy=True) for p in model.parameters()],
                   [b.detach().to("cpu", copy=True) for b in model.buffers()])

    @property
    def parameter_specs(self) -> list[TensorSpec]:
        return [spec for spec in self.tensors if not spec.buffer]

    @property
    def buffer_specs(self) -> list[TensorSpec]:
        return [spec for spec in self.tensors if spec.buffer]


def write_weights(path: Path, state: ModelState) -> None:
    """Write `state` as a safetensors file with lbgm's metadata (see the module doc)."""
    named = {spec.name: tensor.detach().contiguous().clone()
             for spec, tensor in zip(state.tensors, [*state.params, *state.buffers], strict=True)}
    if len(named) != len(state.tensors):
        raise WeightsError("the model names two tensors alike; safetensors keeps one tensor per name")
    metadata = {FORMAT_KEY: WEIGHTS_FORMAT,
                PARAMETERS_KEY: json.dumps([spec.name for spec in state.parameter_specs]),
                BUFFERS_KEY: json.dumps([spec.name for spec in state.buffer_specs])}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(named, str(temporary), metadata=metadata)
    temporary.replace(path)


def save_weights(model: nn.Module, path: Path) -> ModelState:
    """Write `model`'s parameters and buffers as a weights file for `lbgm server --weights`; returns what
    was written."""
    state = ModelState.of_model(model)
    write_weights(Path(path), state)
    return state


def _name_list(path: Path, metadata: dict[str, str], key: str) -> list[str]:
    try:
        names = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        raise WeightsError(f"weights file {path}: metadata {key!r} is missing or not JSON; {HOW_TO_WRITE}") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise WeightsError(f"weights file {path}: metadata {key!r} must be a JSON list of tensor names")
    return names


def _ordered_names(path: Path, metadata: dict[str, str], stored: Sequence[str]) -> tuple[list[str], list[str]]:
    """(parameter names, buffer names) in travel order, checked against the tensors the file holds."""
    if metadata.get(FORMAT_KEY) != WEIGHTS_FORMAT:
        found = f"format {metadata[FORMAT_KEY]!r}" if FORMAT_KEY in metadata else "no lbgm metadata"
        raise WeightsError(f"weights file {path} has {found} (this lbgm reads format {WEIGHTS_FORMAT}); "
                           f"{HOW_TO_WRITE}")
    parameters, buffers = _name_list(path, metadata, PARAMETERS_KEY), _name_list(path, metadata, BUFFERS_KEY)
    listed = [*parameters, *buffers]
    problems = []
    if not parameters:
        problems.append("it lists no parameters")
    if duplicates := sorted({name for name in listed if listed.count(name) > 1}):
        problems.append(f"it lists {duplicates} twice")
    if missing := sorted(set(listed) - set(stored)):
        problems.append(f"it lists {missing}, which the file does not hold")
    if unlisted := sorted(set(stored) - set(listed)):
        problems.append(f"the file holds {unlisted}, which it does not list")
    if problems:
        raise WeightsError(f"weights file {path}: inconsistent lbgm metadata: {'; '.join(problems)}")
    return parameters, buffers


def read_weights(path: Path) -> ModelState:
    """The model state a weights file holds; WeightsError (one line) if it is not a usable one."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored = list(handle.keys())
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"weights file {path} is not a safetensors file: {error}") from None
    parameters, buffers = _ordered_names(path, metadata, stored)
    floating = [name for name in parameters if not tensors[name].is_floating_point()]
    if floating:
        raise WeightsError(f"weights file {path}: parameters {floating} are not floating point, so they cannot "
                           f"be trained")
    return ModelState(tuple([describe_tensor(name, tensors[name], False) for name in parameters]
                            + [describe_tensor(name, tensors[name], True) for name in buffers]),
                      [tensors[name] for name in parameters], [tensors[name] for name in buffers])
