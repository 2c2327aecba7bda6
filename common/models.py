"""Model zoo, selectable by name. Each model's parameter order is the LBGM
layer order: unit i of the "layer" granularity is `list(model.parameters())[i]`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn


def reference_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The LBGM authors' CNN: conv(20,5x5)-pool-conv(50,5x5)-pool-fc(500)-fc(classes)."""
    flat = 50 * 4 * 4 if in_channels == 1 else 50 * 5 * 5
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def fully_connected(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """The authors' FCN: a single linear layer (multinomial logistic regression)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def multilayer_perceptron(in_features: int = 784, hidden: int = 200, num_classes: int = 10) -> nn.Module:
    """A small MLP: cheap enough for full-batch local steps on two CPU cores."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": reference_cnn,
    "fcn": fully_connected,
    "mlp": multilayer_perceptron,
}


def build_model(name: str, seed: int) -> nn.Module:
    """A freshly initialised model; the same (name, seed) gives the same weights."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return factory()
    finally:
        torch.random.set_rng_state(generator_state)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of parameter names and shapes: server and worker must agree on it."""
    description = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return hashlib.sha256(description.encode()).hexdigest()[:16]
