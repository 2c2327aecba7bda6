"""Data sets: the embedded subset, the official MNIST / Fashion-MNIST files (read-only),
and CIFAR-10/100 batches in the official python format, read without trusting pickle."""

from __future__ import annotations

import os
import pickle
import re
import socket
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from lbgm.tasks.datasets import (DATASET_SHAPES, DATASETS, EMBEDDED, INFO, NUM_CLASSES, DatasetError,
                                  load_dataset)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # <repo>/../shared/data
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir(),
    reason=f"official MNIST/Fashion-MNIST files not found in {SHARED_DATA} (a sibling shared/ of the clone)")


def write_batch(path: Path, batch: object) -> None:
    """Pickle protocol 2, as the official files (which Python 2's cPickle wrote)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def cifar_batch(rng: np.random.Generator, size: int, num_classes: int, title: bytes) -> dict[bytes, object]:
    """A batch dict with the official keys: CIFAR-10 has b"labels", CIFAR-100 b"fine_labels" and b"coarse_labels"."""
    data = rng.integers(0, 256, size=(size, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, num_classes, size=size)]
    batch: dict[bytes, object] = {b"batch_label": title, b"data": data,
                                  b"filenames": [f"image_{i:05d}.png".encode() for i in range(size)]}
    if num_classes == 10:
        batch[b"labels"] = labels
    else:
        batch[b"fine_labels"] = labels
        batch[b"coarse_labels"] = [label // 5 for label in labels]
    return batch


def write_cifar(data_dir: Path, name: str, sizes: dict[str, list[int]], seed: int = 0) -> dict[str, tuple]:
    """A synthetic `name` folder in the official layout; per split, the (pixels, labels) written."""
    rng = np.random.default_rng(seed)
    info = INFO[name]
    written = {}
    for split, batch_sizes in sizes.items():
        batches = [cifar_batch(rng, size, info.num_classes, f"{split} batch {i + 1} of {len(batch_sizes)}".encode())
                   for i, size in enumerate(batch_sizes)]
        for file_name, batch in zip(info.files[split], batches, strict=True):
            write_batch(data_dir / info.folder / file_name, batch)
        written[split] = (np.concatenate([b[b"data"] for b in batches]),
                          [label for b in batches for label in b[info.label_key]])
    return written


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    write_cifar(tmp_path, "cifar10", {"train": [4] * 5, "test": [3]})
    return tmp_path


def unnormalise(images: torch.Tensor, name: str) -> np.ndarray:
    info = INFO[name]
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    return np.rint(((images * std + mean) * 255).numpy()).astype(np.int64)


@pytest.mark.parametrize("name, sizes", [
    ("cifar10", {"train": [4, 4, 3, 4, 4], "test": [3]}),
    ("cifar100", {"train": [30], "test": [5]}),
])
def test_cifar_folder_in_the_official_format_loads(tmp_path, name, sizes):
    written = write_cifar(tmp_path, name, sizes)
    for split, (pixels, labels) in written.items():
        dataset = load_dataset(name, split, tmp_path)
        assert dataset.images.shape == (sum(sizes[split]), 3, 32, 32) and dataset.images.dtype == torch.float32
        assert dataset.labels.tolist() == labels and dataset.labels.dtype == torch.int64
        assert dataset.num_classes == NUM_CLASSES[name] and max(labels) < NUM_CLASSES[name]
        assert np.array_equal(unnormalise(dataset.images, name), pixels.reshape(-1, 3, 32, 32))


def test_cifar_rows_are_red_green_blue_planes_normalised_per_channel(tmp_path):
    row = np.concatenate([np.full(1024, 255), np.zeros(1024), np.arange(1024) % 256]).astype(np.uint8)
    write_batch(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": row[None], b"labels": [3]})
    image = load_dataset("cifar10", "test", tmp_path).images[0]
    mean, std = INFO["cifar10"].mean, INFO["cifar10"].std
    assert torch.allclose(image[0], torch.full((32, 32), (1.0 - mean[0]) / std[0]))
    assert torch.allclose(image[1], torch.full((32, 32), (0.0 - mean[1]) / std[1]))
    assert image[2, 0, 1] == pytest.approx((1 / 255 - mean[2]) / std[2])  # row-major pixels
    assert image[2, 1, 0] == pytest.approx((32 / 255 - mean[2]) / std[2])


def python2_batch(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files hold it: Python 2 cPickle, protocol 2, str written as
    SHORT_BINSTRING, the array rebuilt by numpy.core.multiarray._reconstruct (pre-numpy-2 path)."""
    def text(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    raw = pixels.tobytes()
    rows, columns = pixels.shape
    return (b"\x80\x02}(" + text(b"data")
            + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R"
            + b"(K\x01" + b"M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", columns) + b"\x86"
            + b"cnumpy\ndtype\n" + text(b"u1") + b"\x89\x88\x87R"
            + b"(K\x03" + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
            + text(b"labels") + b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
            + text(b"batch_label") + text(b"testing batch 1 of 1") + b"u.")


def test_a_batch_written_by_python2_like_the_originals_loads(tmp_path):
    pixels = (np.arange(3 * 3072) % 251).astype(np.uint8).reshape(3, 3072)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(python2_batch(pixels, [7, 3, 9]))
    dataset = load_dataset("cifar10", "test", tmp_path)
    assert dataset.labels.tolist() == [7, 3, 9]
    assert np.array_equal(unnormalise(dataset.images, "cifar10"), pixels.reshape(-1, 3, 32, 32))


def test_cifar_statistics_are_the_published_ones():
    assert INFO["cifar10"].mean == (0.4914, 0.4822, 0.4465) and INFO["cifar10"].std == (0.2470, 0.2435, 0.2616)
    assert INFO["cifar100"].mean == (0.5071, 0.4865, 0.4409) and INFO["cifar100"].std == (0.2673, 0.2564, 0.2762)


class RunsCode:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("make", [
    lambda marker: RunsCode(os.system, f"touch {marker}"),
    lambda marker: RunsCode(exec, f"open({str(marker)!r}, 'w').close()"),
    lambda marker: RunsCode(Path.touch, marker),
])
def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, make):
    marker = tmp_path / "pwned"
    write_batch(tmp_path / "cifar-10-batches-py" / "test_batch",
                {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": make(marker)})
    with pytest.raises(DatasetError, match="refused"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


def test_bytes_decoding_other_than_latin1_is_refused(tmp_path):
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)
    assert payload.count(b"\x06\x00\x00\x00latin1") == 1  # written once, then taken from the memo
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(payload.replace(b"\x06\x00\x00\x00latin1", b"\x06\x00\x00\x00base64"))
    with pytest.raises(DatasetError, match="encoding 'base64' refused"):
        load_dataset("cifar10", "test", tmp_path)


@pytest.mark.parametrize("payload", [
    b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85R.",  # numpy.ndarray((2**30,)) called directly
    b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85U\x01b\x87R.",
    b"\x80\x02cnumpy\ndtype\nU\x02O8\x89\x88\x87R.",  # object dtype
])
def test_allowed_numpy_names_cannot_be_misused(tmp_path, payload):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="refused|not a CIFAR python batch"):
        load_dataset("cifar10", "test", tmp_path)


@pytest.mark.parametrize("batch, problem", [
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "expected a uint8 array of shape"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "expected a uint8 array of shape"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must be 2 integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"must lie in \[0, 10\)"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no b'labels' entry"),
    ([1, 2, 3], "holds a list"),
])
def test_malformed_batch_says_what_is_wrong(tmp_path, batch, problem):
    write_batch(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(DatasetError, match=problem):
        load_dataset("cifar10", "test", tmp_path)


def test_truncated_batch_is_a_dataset_error(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match=re.escape(f"{path} is not a CIFAR python batch")):
        load_dataset("cifar10", "test", cifar10_dir)


def test_missing_batch_files_are_named_with_their_folder(cifar10_dir):
    folder = cifar10_dir / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", "train", cifar10_dir)
    assert f"missing data_batch_3, data_batch_5 in {folder};" in str(error.value)
    assert load_dataset("cifar10", "test", cifar10_dir).images.shape == (3, 3, 32, 32)  # other split unaffected


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar100", "test", tmp_path)
    assert f"missing test in {tmp_path / 'cifar-100-python'} (the folder does not exist)" in str(error.value)
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("mnist", "test")


@pytest.fixture
def offline(monkeypatch):
    """No connection can be opened; records the attempts."""
    attempts: list[object] = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


def test_default_never_touches_the_network(tmp_path, offline):
    with pytest.raises(DatasetError, match=f"lbgm fetch-data --dataset cifar10 --data-dir {tmp_path}"):
        load_dataset("cifar10", "train", tmp_path)
    assert offline == []


def test_fetch_data_offline_is_one_line_and_exit_2(tmp_path, offline, capsys):
    from lbgm.cli.main import main

    assert main(["fetch-data", "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lbgm fetch-data: error: cifar10 train split: missing")
    assert "Network is unreachable" in error and "Traceback" not in error
    assert offline == [("www.cs.toronto.edu", 443)]


def test_download_offline_fails_fast_naming_files_folder_and_writability(tmp_path, offline):
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", "test", tmp_path, download=True)
    message = str(error.value)
    assert f"missing test_batch in {tmp_path / 'cifar-10-batches-py'}" in message
    assert "Network is unreachable" in message and "writable" in message
    assert offline == [("www.cs.toronto.edu", 443)]


def test_download_into_an_unwritable_place_fails_before_any_connection(tmp_path, offline):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")  # a regular file cannot hold a data folder, even for root
    with pytest.raises(DatasetError, match="not writable"):
        load_dataset("mnist", "test", not_a_folder, download=True)
    assert offline == []


def test_embedded_mnist_still_loads():
    train, test = load_dataset(EMBEDDED, "train"), load_dataset(EMBEDDED, "test")
    assert (len(train), len(test)) == (12_000, 2_000)
    assert train.images.shape[1:] == DATASET_SHAPES[EMBEDDED] and train.num_classes == 10
    assert int(train.labels[0]) == 5


@needs_shared_data
@pytest.mark.parametrize("name, first_train_label", [("mnist", 5), ("fashion-mnist", 9)])
def test_official_files_load_from_the_read_only_shared_folder(name, first_train_label):
    train, test = load_dataset(name, "train", SHARED_DATA), load_dataset(name, "test", SHARED_DATA)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert int(train.labels[0]) == first_train_label
    assert train.labels.min() == 0 and train.labels.max() == 9 and torch.bincount(train.labels).min() >= 5000
    assert abs(float(train.images.mean())) < 1e-3 and abs(float(train.images.std()) - 1) < 1e-3


def test_every_data_set_has_a_shape_and_a_class_count():
    assert set(DATASET_SHAPES) == set(NUM_CLASSES) == set(DATASETS)
    assert DATASET_SHAPES["cifar100"] == (3, 32, 32) and NUM_CLASSES["cifar100"] == 100
    assert DATASET_SHAPES["fashion-mnist"] == (1, 28, 28) and NUM_CLASSES["cifar10"] == 10


@pytest.mark.parametrize("name, split", [("imagenet", "train"), ("mnist", "validation")])
def test_unknown_names_are_value_errors(name, split):
    with pytest.raises(ValueError, match=repr(name if split == "train" else split)):
        load_dataset(name, split)
