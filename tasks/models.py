"""Model zoo, selectable by name. Each model's parameter order is the LBGM
layer order: unit i of the "layer" granularity is `list(model.parameters())[i]`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lbgm.task.loader import seeded


InputShape = tuple[int, int, int]  # channels, height, width


def reference_cnn(shape: InputShape, num_classes: int) -> nn.Module:
    """The LBGM authors' CNN: conv(20,5x5)-pool-conv(50,5x5)-pool-fc(500)-fc(classes)."""
    channels, height, width = shape

    def side(size: int) -> int:  # two (5x5 valid conv, 2x2 pool) stages
        return ((size - 4) // 2 - 4) // 2

    flat = 50 * side(height) * side(width)
    return nn.Sequential(
        nn.Conv2d(channels, 20, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def fully_connected(shape: InputShape, num_classes: int) -> nn.Module:
    """The authors' FCN: a single linear layer (multinomial logistic regression)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))


def multilayer_perceptron(shape: InputShape, num_classes: int, hidden: int = 200) -> nn.Module:
    """A small MLP: cheap enough for full-batch local steps on two CPU cores."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs),
        )
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18(shape: InputShape, num_classes: int) -> nn.Module:
    """ResNet-18, CIFAR variant: 3x3 stem without max-pool, four stages of two basic blocks."""
    layers: list[nn.Module] = [nn.Conv2d(shape[0], 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    inputs = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(inputs, outputs, stride), _BasicBlock(outputs, outputs, 1)]
        inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg19_bn(shape: InputShape, num_classes: int) -> nn.Module:
    """VGG-19 with BatchNorm, CIFAR variant (one linear classifier on the 512 features)."""
    if shape[1] < 32 or shape[2] < 32:
        raise ValueError(f"vgg19_bn pools five times and needs inputs of at least 32x32, got {shape[1]}x{shape[2]}")
    layers: list[nn.Module] = []
    inputs = shape[0]
    for item in VGG19:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(inputs, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            inputs = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "cnn": reference_cnn,
    "fcn": fully_connected,
    "mlp": multilayer_perceptron,
    "resnet18": resnet18,
    "vgg19_bn": vgg19_bn,
}


def build_model(name: str, seed: int, shape: InputShape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """A freshly initialised model; the same arguments give the same weights.

    BatchNorm running statistics are buffers, not gradients: they travel with
    the global model, each worker uploads its own after local training, and
    the server averages them weighted by sample counts (FedAvg-style); LBGM
    never compresses them.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return seeded(seed, lambda: factory(shape, num_classes))
