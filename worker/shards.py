"""A worker's local data: its shard of the training set.

The server only names the data set, the partition scheme, the seed and the
shard index; every worker computes the same deterministic partition and keeps
its own part. Virtual workers in one process share the loaded data set and
partition through a small cache.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import torch

from lbgm.common.datasets import ImageDataset, load_dataset
from lbgm.common.partition import class_summary, partition
from lbgm.v1 import lbgm_pb2 as pb

log = logging.getLogger(__name__)
_loading = threading.Lock()  # virtual workers starting together load the data once


@functools.lru_cache(maxsize=4)
def _training_set(name: str, data_dir: str) -> ImageDataset:
    return load_dataset(name, "train", Path(data_dir) if data_dir else None)


@functools.lru_cache(maxsize=4)
def _partition(name: str, data_dir: str, num_shards: int, scheme: str, seed: int, k: int,
               alpha: float) -> tuple[torch.Tensor, ...]:
    labels = _training_set(name, data_dir).labels
    return tuple(partition(labels, num_shards, scheme, seed, classes_per_worker=k, alpha=alpha))


def local_shard(spec: pb.ExperimentSpec, shard_index: int, data_dir: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, number of classes) of shard `shard_index` under the experiment's partition."""
    if shard_index >= spec.num_shards:
        raise ValueError(f"shard {shard_index} does not exist; the experiment has {spec.num_shards}")
    with _loading:
        dataset = _training_set(spec.dataset, data_dir)
        shards = _partition(spec.dataset, data_dir, spec.num_shards, spec.partition, spec.seed,
                            spec.classes_per_worker, spec.dirichlet_alpha)
    indices = shards[shard_index]
    counts = class_summary(dataset.labels, [indices], dataset.num_classes)[0]
    log.info("shard %d: %d samples, per class %s", shard_index, len(indices), counts)
    return dataset.images[indices], dataset.labels[indices], dataset.num_classes
