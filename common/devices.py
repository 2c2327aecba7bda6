"""Which torch device a process computes on: `--device auto|cpu|cuda|cuda:N|mps`.

A device is a per-process choice (a worker's training and LBGM decision, a server's central
evaluation), never an experiment setting: what the server and the workers agree on is defined
by the bytes on the wire, which are the same whatever device produced them, so a federation
may mix CPU and GPU workers. A device that does not exist is refused at startup, before the
process joins or listens.
"""

from __future__ import annotations

import re
from typing import Any

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(?::(\d+))?")


class DeviceError(ValueError):
    """A device name that is malformed or names a device this machine does not have."""


def resolve_device(name: str, cuda_devices: int, mps_available: bool, what: str = "device") -> torch.device:
    """The device `name` stands for on a machine with `cuda_devices` CUDA devices and (or not) MPS;
    DeviceError, its message starting with `what` (e.g. the flag), if it is malformed or absent.

    auto picks cuda if there is one, else mps, else cpu; cuda is the current CUDA device."""
    match = _DEVICE_NAME.fullmatch(name.strip().lower())
    if match is None:
        raise DeviceError(f"{what} must be {DEVICE_CHOICES}, got {name!r}")
    kind, index = match.group(0).split(":")[0], match.group(1)
    if kind == "auto":
        return torch.device("cuda" if cuda_devices else "mps" if mps_available else "cpu")
    if kind == "cuda" and cuda_devices == 0:
        raise DeviceError(f"{what} {name!r} is not available: this machine has no CUDA device "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    if kind == "cuda" and index is not None and int(index) >= cuda_devices:
        raise DeviceError(f"{what} {name!r} is not available: this machine has {cuda_devices} CUDA "
                          f"device{'s' if cuda_devices > 1 else ''} (cuda:0 to cuda:{cuda_devices - 1})")
    if kind == "mps" and not mps_available:
        raise DeviceError(f"{what} {name!r} is not available: this machine has no MPS (Apple Metal) device")
    return torch.device(kind, int(index)) if index is not None else torch.device(kind)


def local_device(name: str, what: str = "device") -> torch.device:
    """The device `name` stands for on this machine; DeviceError (message starting with `what`) if
    it is malformed or this machine has no such device."""
    mps = getattr(torch.backends, "mps", None)
    return resolve_device(name, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                          bool(mps is not None and mps.is_available()), what)


def move_to(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (also inside tuples, lists and dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields one by one
        return type(value)(*(move_to(item, device) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: move_to(item, device) for key, item in value.items()}
    return value
