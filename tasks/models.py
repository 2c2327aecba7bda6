"""Model zoo, selectable by name. Each model's parameter order is the LBGM
layer order: unit i of the "layer" granularity is `list(model.parameters())[i]`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lbgm.task.loader import seeded
from lbgm.tasks import INITS


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


UNIFORM_BITS = 24  # torch's CPU uniform_ for float32 keeps the low 24 bits of one 32-bit draw


def torch14_uniform_(tensor: torch.Tensor, low: float, high: float) -> None:
    """tensor.uniform_(low, high) as torch 1.4.0 (the reference's pin, FedOptim requirements.txt)
    computed it on the CPU. Both versions take one 32-bit draw of the global generator per value,
    in order, and keep its low 24 bits u; torch 1.4 then rounds twice in float32,
    (u * 2**-24 * (high - low)) + low, where today's torch computes in double and rounds once,
    so about half the values differ in their last bit. torch.randint(0, 2**24) takes the same
    draw and gives u."""
    drawn = torch.randint(0, 2**UNIFORM_BITS, tuple(tensor.shape), dtype=torch.int64)
    low32 = torch.tensor(low, dtype=torch.float32)
    span32 = torch.tensor(high, dtype=torch.float32) - low32
    with torch.no_grad():
        tensor.copy_(drawn.to(torch.float32) * 2.0**-UNIFORM_BITS * span32 + low32)


def _torch14_reset(layer: nn.Conv2d | nn.Linear) -> None:
    """The layer's reset_parameters() of torch 1.4 (nn/modules/conv.py:48-53, linear.py:79-84):
    kaiming_uniform_(weight, a=sqrt(5)), then the bias uniform in +-1/sqrt(fan_in); the bounds in
    double as torch 1.4's nn/init.py:310-315 gives them."""
    fan_in = layer.weight[0].numel()
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    torch14_uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        bias_bound = 1 / math.sqrt(fan_in)
        torch14_uniform_(layer.bias, -bias_bound, bias_bound)


def reference_initialised(make: Callable[[], nn.Module]) -> nn.Module:
    """make()'s model with its Conv2d and Linear layers drawn again, from the random state make()
    started from and in the same order, as torch 1.4 drew them: under torch.manual_seed(seed) the
    reference's weights for that seed (its CNN: FedOptim src/models/cnn.py, seeded by
    src/common/utils.py:50 from src/train_federated.py:29 before src/models/utils.py:55 builds it).
    Layers must be created in the order they are registered; BatchNorm draws nothing."""
    start = torch.random.get_rng_state()
    model = make()
    torch.random.set_rng_state(start)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _torch14_reset(module)
        elif not isinstance(module, nn.BatchNorm2d) and any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"init=reference knows torch 1.4's initialisation of Conv2d, Linear and BatchNorm2d "
                             f"only; the model has parameters in a {type(module).__name__}")
    return model


MODELS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "cnn": reference_cnn,
    "fcn": fully_connected,
    "mlp": multilayer_perceptron,
    "resnet18": resnet18,
    "vgg19_bn": vgg19_bn,
}


def build_model(name: str, seed: int, shape: InputShape = (1, 28, 28), num_classes: int = 10,
                init: str = "default") -> nn.Module:
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
    return seeded(seed, initialised(lambda: factory(shape, num_classes), init))


def initialised(make: Callable[[], nn.Module], init: str) -> Callable[[], nn.Module]:
    """The model factory for initialisation `init` (one of INITS)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    return make if init == "default" else lambda: reference_initialised(make)
