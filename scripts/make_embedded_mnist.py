"""Rebuild tasks/embedded/ from the official MNIST files.

Usage: python scripts/make_embedded_mnist.py ../shared/data/MNIST/raw

Takes the first TRAIN_SAMPLES training and TEST_SAMPLES test images (and
labels) of the official IDX files, unchanged, and writes them as gzip IDX
files, so the loader reads embedded and full data the same way.
"""

import gzip
import struct
import sys
from pathlib import Path

TRAIN_SAMPLES = 12_000
TEST_SAMPLES = 2_000
OUT = Path(__file__).resolve().parents[1] / "common" / "embedded"


def subset(source: Path, target: Path, count: int) -> None:
    data = gzip.decompress(source.read_bytes())
    ndim = data[3]
    shape = list(struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim]))
    per_item = 1
    for dim in shape[1:]:
        per_item *= dim
    shape[0] = count
    header = data[:4] + struct.pack(f">{ndim}I", *shape)
    body = data[4 + 4 * ndim:4 + 4 * ndim + count * per_item]
    target.write_bytes(gzip.compress(header + body, compresslevel=9, mtime=0))


def main(raw: Path) -> None:
    for stem, count in [("train-images-idx3-ubyte", TRAIN_SAMPLES), ("train-labels-idx1-ubyte", TRAIN_SAMPLES),
                        ("t10k-images-idx3-ubyte", TEST_SAMPLES), ("t10k-labels-idx1-ubyte", TEST_SAMPLES)]:
        subset(raw / f"{stem}.gz", OUT / f"{stem}.gz", count)
        print(f"wrote {OUT / stem}.gz ({count} items)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
