"""Test-set evaluation of the global model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lbgm.common.datasets import ImageDataset


def load_state(model: nn.Module, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = ()) -> None:
    """Copy parameters (and buffers, e.g. BatchNorm statistics) into the model."""
    with torch.no_grad():
        for target, source in zip(model.parameters(), params, strict=True):
            target.copy_(source)
        for target, source in zip(model.buffers(), buffers, strict=True):
            target.copy_(source)


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the whole data set."""
    model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start:start + batch_size]
        labels = dataset.labels[start:start + batch_size]
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return correct / len(dataset), loss_sum / len(dataset)
