"""Putting a model state (what travels: parameters, then buffers) into a model, for evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def load_state(model: nn.Module, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = ()) -> None:
    """Copy parameters (and buffers, e.g. BatchNorm statistics) into the model."""
    with torch.no_grad():
        for target, source in zip(model.parameters(), params, strict=True):
            target.copy_(source)
        for target, source in zip(model.buffers(), buffers, strict=True):
            target.copy_(source)
