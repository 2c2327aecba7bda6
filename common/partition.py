"""Split a training set among workers, deterministically for a seed.

- iid: a random permutation cut into equal parts.
- shards: k classes per worker, the LBGM reference scheme: class labels are
  dealt from a stream of random permutations of all classes, and each class's
  samples are split evenly among the workers that hold it.
- dirichlet: per class, worker proportions drawn from Dirichlet(alpha).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PARTITIONS = ("iid", "shards", "dirichlet")


def partition(
    labels: torch.Tensor,
    num_shards: int,
    scheme: str,
    seed: int,
    classes_per_worker: int = 3,
    alpha: float = 0.5,
) -> list[torch.Tensor]:
    """Sample indices of each of `num_shards` disjoint shards."""
    if num_shards < 1 or num_shards > len(labels):
        raise ValueError(f"need 1 <= num_shards <= {len(labels)} samples, got {num_shards}")
    rng = np.random.default_rng(seed)
    label_array = labels.numpy()
    if scheme == "iid":
        shards = np.array_split(rng.permutation(len(label_array)), num_shards)
    elif scheme == "shards":
        shards = _label_shards(label_array, num_shards, classes_per_worker, rng)
    elif scheme == "dirichlet":
        shards = _dirichlet(label_array, num_shards, alpha, rng)
    else:
        raise ValueError(f"unknown partition {scheme!r}; choose one of {list(PARTITIONS)}")
    return [torch.as_tensor(np.sort(shard), dtype=torch.int64) for shard in shards]


def _label_shards(labels: np.ndarray, num_shards: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ValueError(f"classes_per_worker must lie in [1, {len(classes)}], got {k}")
    held: list[list[int]] = []
    stream: list[int] = []
    for _ in range(num_shards):
        mine: list[int] = []
        while len(mine) < k:
            if not stream:
                stream = list(rng.permutation(classes))
            label = int(stream.pop(0))
            if label not in mine:
                mine.append(label)
        held.append(mine)
    pieces: dict[int, list[np.ndarray]] = {}
    for label in classes:
        holders = [worker for worker, mine in enumerate(held) if label in mine]
        members = rng.permutation(np.flatnonzero(labels == label))
        pieces[int(label)] = np.array_split(members, len(holders)) if holders else []
    cursor = {int(label): 0 for label in classes}
    shards = []
    for mine in held:
        parts = []
        for label in mine:
            parts.append(pieces[label][cursor[label]])
            cursor[label] += 1
        shards.append(np.concatenate(parts))
    return shards


def _dirichlet(labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards)) * len(members)).astype(int)[:-1]
            for worker, piece in enumerate(np.split(members, cuts)):
                parts[worker].append(piece)
        shards = [np.concatenate(p) for p in parts]
        if min(len(s) for s in shards) > 0:
            return shards
    raise ValueError(f"Dirichlet({alpha}) left a worker without data in 100 draws; raise alpha or use fewer workers")


def class_summary(labels: torch.Tensor, shards: Sequence[torch.Tensor], num_classes: int) -> list[list[int]]:
    """Per shard, the number of samples of each class."""
    return [torch.bincount(labels[shard], minlength=num_classes).tolist() for shard in shards]
