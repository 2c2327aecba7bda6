"""Image classification data sets as in-memory tensors.

`mnist-embedded` ships inside the package (common/embedded/, a real subset of
the official MNIST files) so the first run needs neither network nor a data
folder. `mnist` and `fashion-mnist` read the official IDX files (.gz or
unpacked) straight from `data_dir/<MNIST|FashionMNIST>/raw/`, which may be
read-only: nothing is ever written there.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# name -> (folder under data_dir, mean, std) for the single-channel IDX sets.
IDX_DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530),
}
EMBEDDED = "mnist-embedded"
DATASETS = (EMBEDDED, *IDX_DATASETS)


class DatasetError(RuntimeError):
    """A data set is missing or its files are malformed."""


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # float32, N x C x H x W, normalised
    labels: torch.Tensor  # int64, N
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzip-compressed) as a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header_end = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = header_end + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise DatasetError(f"{path} holds {len(data)} bytes, its header implies {expected}")
    return torch.frombuffer(bytearray(data[header_end:]), dtype=torch.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing {folder / stem}.gz (or its unpacked form {folder / stem})")


def _normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return ((images.to(torch.float32) / 255.0 - mean) / std).unsqueeze(1)


def load_dataset(name: str, split: str, data_dir: Path | None = None) -> ImageDataset:
    """The `split` ("train" or "test") of data set `name`."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_stem, label_stem = IDX_FILES[split]
    if name == EMBEDDED:
        folder = Path(str(resources.files("lbgm.common.embedded")))
        mean, std = IDX_DATASETS["mnist"][1:]
    elif name in IDX_DATASETS:
        if data_dir is None:
            raise DatasetError(f"data set {name!r} needs --data-dir (a folder holding {IDX_DATASETS[name][0]}/raw/)")
        subfolder, mean, std = IDX_DATASETS[name]
        folder = Path(data_dir) / subfolder / "raw"
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    images = read_idx(_find_idx(folder, image_stem))
    labels = read_idx(_find_idx(folder, label_stem)).to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageDataset(images=_normalise(images, mean, std), labels=labels, num_classes=10)
