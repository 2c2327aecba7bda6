"""Image classification data sets as in-memory tensors.

`mnist-embedded` ships inside the package (tasks/embedded/, a real subset of
the official MNIST files) so the first run needs neither network nor a data
folder. The others are read from the official files in a data folder, which
may be read-only: nothing is ever written there unless a download is asked for.

| name           | files under data_dir                                        | shape     | classes |
|----------------|-------------------------------------------------------------|-----------|---------|
| mnist          | MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] | 1 x 28x28 | 10      |
| fashion-mnist  | FashionMNIST/raw/ (same names as MNIST)                     | 1 x 28x28 | 10      |
| cifar10        | cifar-10-batches-py/data_batch_1..5, test_batch             | 3 x 32x32 | 10      |
| cifar100       | cifar-100-python/train, test (labels: fine_labels)          | 3 x 32x32 | 100     |

Pixels are scaled to [0, 1], then normalised per channel with the training
set's mean and standard deviation (population statistics over all training
pixels, listed in INFO). For CIFAR-10 that is std (0.2470, 0.2435, 0.2616); the
LBGM authors' code uses the often-copied (0.2023, 0.1994, 0.2010), which is not
the training set's std. No augmentation is applied: the sets are plain tensors.

The CIFAR "python version" batches are pickles. They are read with a
restricted unpickler (`CifarUnpickler`) that can only rebuild numpy arrays,
so a crafted file cannot run code. torchvision's dataset classes are not used
for reading (they insist on the official MD5s); with `download=True` its
download helpers fetch and unpack the official archives into the data folder.
"""

from __future__ import annotations

import gzip
import io
import pickle
import socket
import struct
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lbgm.common.errors import DatasetError

try:  # numpy >= 2 (and 1.26's forward-compatible alias)
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_ROW = 3 * 32 * 32  # one image per row: 1024 red, 1024 green, 1024 blue values, row-major
DOWNLOAD_TIMEOUT = 10.0  # seconds to reach a download host before giving up


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set, and where its files live."""

    folder: str  # under data_dir; "" = shipped inside the package
    files: dict[str, tuple[str, ...]]  # split -> file names in the folder
    shape: tuple[int, int, int]  # channels, height, width
    num_classes: int
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    label_key: bytes = b""  # CIFAR batches: the dict key holding the labels; b"" = IDX files
    files_hint: str = field(default="", compare=False)  # how the files are obtained, for error messages


_CIFAR10_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
INFO: dict[str, DatasetInfo] = {
    "mnist-embedded": DatasetInfo("", IDX_FILES, (1, 28, 28), 10, (0.1307,), (0.3081,)),
    "mnist": DatasetInfo("MNIST/raw", IDX_FILES, (1, 28, 28), 10, (0.1307,), (0.3081,),
                         files_hint="the official MNIST .gz files (or unpacked)"),
    "fashion-mnist": DatasetInfo("FashionMNIST/raw", IDX_FILES, (1, 28, 28), 10, (0.2860,), (0.3530,),
                                 files_hint="the official Fashion-MNIST .gz files (or unpacked)"),
    "cifar10": DatasetInfo("cifar-10-batches-py", _CIFAR10_SPLITS, (3, 32, 32), 10,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), label_key=b"labels",
                           files_hint="the python version of CIFAR-10 (cifar-10-python.tar.gz, unpacked)"),
    "cifar100": DatasetInfo("cifar-100-python", {"train": ("train",), "test": ("test",)}, (3, 32, 32), 100,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), label_key=b"fine_labels",
                            files_hint="the python version of CIFAR-100 (cifar-100-python.tar.gz, unpacked)"),
}
EMBEDDED = "mnist-embedded"
DATASETS = tuple(INFO)
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {name: info.shape for name, info in INFO.items()}
NUM_CLASSES: dict[str, int] = {name: info.num_classes for name, info in INFO.items()}


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # float32, N x C x H x W, normalised
    labels: torch.Tensor  # int64, N
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzip-compressed) as a uint8 tensor, read straight into its own buffer (no
    copy of the file's bytes: the 47 MB of MNIST's training images are 47 MB while reading, not 141)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            start = handle.read(4)
            if len(start) < 4 or start[0] != 0 or start[1] != 0 or start[2] != 0x08:
                raise DatasetError(f"{path} is not an unsigned-byte IDX file")
            ndim = start[3]
            dimensions = handle.read(4 * ndim)
            if len(dimensions) < 4 * ndim:
                raise DatasetError(f"{path} ends inside its header ({4 + len(dimensions)} bytes, {ndim} dimensions)")
            shape = struct.unpack(f">{ndim}I", dimensions)
            header_end = 4 + 4 * ndim
            expected = header_end + int(np.prod(shape, dtype=np.int64))
            data = bytearray(expected - header_end)
            got = handle.readinto(data)
            extra = len(handle.read(1))
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    if got != len(data) or extra:
        actual = f"{header_end + got} bytes" if not extra else "more bytes"
        raise DatasetError(f"{path} holds {actual}, its header implies {expected}")
    return torch.frombuffer(data, dtype=torch.uint8).reshape(shape) if data else torch.empty(shape, dtype=torch.uint8)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_split(folder: Path, info: DatasetInfo, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_path, label_path = (_idx_path(folder, stem) for stem in info.files[split])
    assert image_path is not None and label_path is not None  # checked by _missing_files
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != info.shape[1:]:
        raise DatasetError(f"{image_path} holds images of shape {tuple(images.shape[1:])}, expected {info.shape[1:]}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{folder}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return images.unsqueeze(1), labels.to(torch.int64)


# --- CIFAR python batches ---------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR batch never contains."""


class _NdarrayName:
    """What the pickle gets for numpy.ndarray: a name to pass to _reconstruct, not a callable."""


def _checked_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    # numpy pickles every array as _reconstruct(ndarray, (0,), b"b") followed by __setstate__
    # with the real shape, dtype and bytes, so memory is bounded by the file's size.
    if subtype is not _NdarrayName or tuple(shape) != (0,):
        raise UnsafePickleError(f"_reconstruct{(subtype, shape, dtype_code)!r} refused: "
                                "only the empty numpy.ndarray that numpy itself pickles is allowed")
    return _numpy_reconstruct(np.ndarray, (0,), dtype_code)


def _checked_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise UnsafePickleError(f"dtype {spec!r} refused: only plain numeric dtypes are allowed")
    dtype = np.dtype(spec.decode("ascii") if isinstance(spec, bytes) else spec, align, copy)
    if dtype.kind not in "biuf":
        raise UnsafePickleError(f"dtype {dtype} refused: only plain numeric dtypes are allowed")
    return dtype


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 writes bytes at pickle protocol 2 as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused: only latin-1 is allowed")
    return text.encode("latin-1")


class CifarUnpickler(pickle.Unpickler):
    """Loads a CIFAR python batch and nothing that could run code.

    The official files (written by Python 2's cPickle, protocol 2) name exactly
    three globals: numpy.core.multiarray._reconstruct, numpy.ndarray and
    numpy.dtype. The same data re-pickled at protocol 2 by Python 3 and numpy 2
    (as the tests do) names numpy._core.multiarray._reconstruct and writes each
    bytes object as _codecs.encode(text, "latin1"). Those, checked, are all that
    `find_class` hands out (numpy.ndarray only as a name _reconstruct accepts,
    never as a callable); anything else raises UnsafePickleError before a
    single call is made.
    """

    ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
        ("numpy", "ndarray"): _NdarrayName,
        ("numpy", "dtype"): _checked_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def __init__(self, handle: io.BufferedIOBase) -> None:
        super().__init__(handle, encoding="bytes")  # Python 2 str -> bytes, as the keys b"data", b"labels"

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"global {module}.{name} refused: a CIFAR batch only rebuilds numpy arrays") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids refused: a CIFAR batch has none")


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 3072 pixels, int64 N labels) of one CIFAR python batch file."""
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle).load()
    except UnsafePickleError as error:
        raise DatasetError(f"{path}: refused to load: {error}") from None
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - the unpickler raises many types on garbage
        raise DatasetError(f"{path} is not a CIFAR python batch: {type(error).__name__}: {error}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, expected a dict with b'data' and {label_key!r}")
    for key in (b"data", label_key):
        if key not in batch:
            raise DatasetError(f"{path} has no {key!r} entry (keys: {sorted(map(repr, batch))})")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: b'data' is a {described}, expected a uint8 array of shape (N, {CIFAR_ROW})")
    try:
        labels = np.asarray(labels)
    except Exception as error:  # noqa: BLE001 - ragged or odd label containers
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers: {error}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DatasetError(f"{path}: {label_key!r} must be {len(data)} integers (one per image), "
                           f"got {labels.dtype} values of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _read_cifar_split(folder: Path, info: DatasetInfo, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [read_cifar_batch(folder / name, info.label_key, info.num_classes) for name in info.files[split]]
    pixels = np.concatenate([data for data, _ in batches])  # also a fresh, writable array for torch
    labels = np.concatenate([labels for _, labels in batches])
    return torch.from_numpy(pixels).reshape(-1, *info.shape), torch.from_numpy(labels)


# --- download (only when asked) ---------------------------------------------------------------


def _archives(name: str) -> list[tuple[list[str], str, str]]:
    """(mirror URLs, archive file name, md5) of each official archive, from torchvision's tables."""
    from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST

    if name in ("cifar10", "cifar100"):
        source = CIFAR10 if name == "cifar10" else CIFAR100
        return [([source.url], source.filename, source.tgz_md5)]
    source = MNIST if name == "mnist" else FashionMNIST
    return [([mirror + filename for mirror in source.mirrors], filename, md5) for filename, md5 in source.resources]


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"{folder} is not writable ({error.strerror or error})") from None


def _reach(url: str) -> None:
    """Fail within DOWNLOAD_TIMEOUT when the host is unreachable (urllib itself may wait minutes)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=DOWNLOAD_TIMEOUT):
        pass


def _download(name: str, data_dir: Path, folder: Path) -> None:
    """Fetch and unpack the official archives of `name` into data_dir (MNIST-style sets: into folder)."""
    # CIFAR archives unpack into their own folder; the IDX .gz files unpack in place.
    target = data_dir if INFO[name].label_key else folder
    _check_writable(target)  # before importing torchvision (seconds) or touching the network
    from torchvision.datasets.utils import download_and_extract_archive

    for urls, filename, md5 in _archives(name):
        errors = []
        for url in urls:
            try:
                _reach(url)
                download_and_extract_archive(url, download_root=str(target), filename=filename, md5=md5)
                break
            except (OSError, RuntimeError, EOFError, tarfile.TarError) as error:  # URLError is an OSError
                errors.append(f"{url}: {error}")
        else:
            raise OSError("; ".join(errors))


# --- loading -----------------------------------------------------------------------------------


def _missing_files(folder: Path, info: DatasetInfo, split: str) -> list[str]:
    if info.label_key:
        return [name for name in info.files[split] if not (folder / name).is_file()]
    return [f"{stem}.gz (or {stem})" for stem in info.files[split] if _idx_path(folder, stem) is None]


def _folder_of(name: str, info: DatasetInfo, data_dir: Path | None) -> Path:
    if name == EMBEDDED:
        return Path(str(resources.files("lbgm.tasks.embedded")))
    if data_dir is None:
        raise DatasetError(f"data set {name!r} needs --data-dir (a folder holding {info.folder}/)")
    return Path(data_dir) / info.folder


def _ensure_files(name: str, info: DatasetInfo, split: str, data_dir: Path | None, download: bool) -> Path:
    folder = _folder_of(name, info, data_dir)
    missing = _missing_files(folder, info, split)
    if not missing:
        return folder
    where = f"in {folder}" if folder.is_dir() else f"in {folder} (the folder does not exist)"
    expected = info.files_hint or "the package data"
    problem = f"{name} {split} split: missing {', '.join(missing)} {where}; expected {expected}"
    if name == EMBEDDED:
        raise DatasetError(f"{problem}: the installed package is incomplete")
    if not download:
        raise DatasetError(f"{problem}. Copy the files there, or fetch them with `lbgm fetch-data --dataset "
                           f"{name} --data-dir {data_dir}` (needs network access and a writable folder)")
    assert data_dir is not None
    try:
        _download(name, Path(data_dir), folder)
    except OSError as error:
        raise DatasetError(f"{problem}. Download failed: {error}. A download needs network access and a "
                           f"writable data folder; offline, copy the files into {folder}") from None
    still_missing = _missing_files(folder, info, split)
    if still_missing:
        raise DatasetError(f"{name}: after the download, still missing {', '.join(still_missing)} in {folder}")
    return folder


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 scaled to [0, 1], minus the channel mean, over the channel std."""
    shape = (1, len(mean), 1, 1)
    scaled = images.to(torch.float32).div_(255.0)
    return scaled.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def read_split(name: str, split: str, data_dir: Path | None = None, *,
               download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The `split` ("train" or "test") of data set `name` as stored: uint8 N x C x H x W pixels and int64
    labels, a quarter of the normalised set's memory, so a process can pick rows before normalising them.

    Files are read from `data_dir/<INFO[name].folder>/`. With `download=True`
    missing files are fetched from the official mirrors into that folder (which
    must then be writable); by default the network is never touched.
    """
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in INFO:
        raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    info = INFO[name]
    folder = _ensure_files(name, info, split, data_dir, download)
    reader = _read_cifar_split if info.label_key else _read_idx_split
    return reader(folder, info, split)


def normalised(name: str, images: torch.Tensor) -> torch.Tensor:
    """Pixels of data set `name` (uint8, any rows of a split) as the model sees them. Every value depends on
    its pixel alone, so normalising a subset gives exactly those rows of the normalised whole."""
    info = INFO[name]
    return _normalise(images, info.mean, info.std)


def load_dataset(name: str, split: str, data_dir: Path | None = None, *, download: bool = False) -> ImageDataset:
    """The `split` ("train" or "test") of data set `name` (see INFO), normalised; see read_split."""
    images, labels = read_split(name, split, data_dir, download=download)
    return ImageDataset(images=normalised(name, images), labels=labels, num_classes=INFO[name].num_classes)
