"""The built-in job: image classification with a zoo model on a partitioned image data set,
written with the task API like any user's task. The experiment settings dataset, model,
partition, classes_per_worker, dirichlet_alpha, eval_batch_size and init are its parameters; local
training is the library's default (tau SGD steps with cross-entropy)."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lbgm.task import Evaluation, Examples, Shard, Task, TaskOptions
from lbgm.tasks.datasets import DATASETS, INFO, load_dataset, normalised, read_split
from lbgm.tasks.models import INITS, MODELS, initialised
from lbgm.tasks.partition import PARTITIONS, class_summary, format_class_summary, partition

log = logging.getLogger(__name__)
HOLD_SECONDS = 10.0  # how long a split read for one shard stays in memory for the next


class RecentSplits:
    """Splits as stored (uint8, a quarter of their normalised size), each dropped `hold_seconds` after its
    last use. The virtual workers of a process starting together (and the server building every shard)
    read the files once, yet a worker process keeps only its own shards once they are loaded: its memory
    does not grow with the data set."""

    def __init__(self, hold_seconds: float) -> None:
        self.hold_seconds = hold_seconds
        self._held: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        self._expiry: dict[Hashable, threading.Timer] = {}
        self._lock = threading.Lock()  # virtual workers starting together read a split once

    def get(self, key: Hashable, read: Callable[[], tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            split = self._held.get(key)
            if split is None:
                split = self._held[key] = read()
            if key in self._expiry:
                self._expiry[key].cancel()
            timer = self._expiry[key] = threading.Timer(self.hold_seconds, self._drop, (key,))
            timer.daemon = True
            timer.start()
            return split

    def held(self) -> list[Hashable]:
        with self._lock:
            return list(self._held)

    def _drop(self, key: Hashable) -> None:
        with self._lock:
            self._held.pop(key, None)
            self._expiry.pop(key, None)


_recent = RecentSplits(HOLD_SECONDS)


def _split(name: str, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of a split, read at most once while virtual workers load their shards."""
    return _recent.get((name, split, data_dir), lambda: read_split(name, split, data_dir))


@dataclass(frozen=True)
class StoredImages:
    """A worker's training images as stored (uint8) with their labels, normalised minibatch by minibatch
    (the task API's Batches): a quarter of the memory of normalised tensors for the same values, as every
    value is normalised from its pixel alone."""

    dataset: str
    pixels: torch.Tensor  # uint8, N x C x H x W
    targets: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalised(self.dataset, self.pixels[indices]), self.targets[indices]


@functools.lru_cache(maxsize=4)
def _shards(name: str, data_dir: Path | None, count: int, scheme: str, seed: int, k: int,
            alpha: float) -> tuple[torch.Tensor, ...]:
    """Every shard's row indices: from the labels alone, kept (8 bytes a training image)."""
    _, labels = _split(name, "train", data_dir)
    return tuple(partition(labels, count, scheme, seed, classes_per_worker=k, alpha=alpha))


@torch.inference_mode()
def accuracy_and_loss(model: nn.Module, data: Examples, batch_size: int) -> Evaluation:
    """Accuracy and mean cross-entropy over the whole data set, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        inputs = data.inputs[start:start + batch_size].to(device)
        labels = data.targets[start:start + batch_size].to(device)
        logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return Evaluation(loss=loss_sum / len(data), accuracy=correct / len(data))


def check_options(options: TaskOptions) -> None:
    checks = [
        (options.dataset in DATASETS, f"dataset must be one of {list(DATASETS)}, got {options.dataset!r}"),
        (options.model in MODELS, f"model must be one of {sorted(MODELS)}, got {options.model!r}"),
        (options.partition in PARTITIONS, f"partition must be one of {list(PARTITIONS)}, got {options.partition!r}"),
        (options.init in INITS, f"init must be one of {list(INITS)}, got {options.init!r}"),
    ]
    if options.partition == "reference" and options.dataset in INFO:
        classes = INFO[options.dataset].num_classes
        checks.append((options.classes_per_worker < classes,
                       f"partition reference needs classes_per_worker below the {classes} classes of "
                       f"{options.dataset} (with all of them the authors' code splits iid instead), "
                       f"got {options.classes_per_worker}"))
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def classification(options: TaskOptions) -> Task:
    """Zoo model `options.model` trained on `options.dataset`, split among workers by `options.partition`."""
    check_options(options)
    info = INFO[options.dataset]
    factory = MODELS[options.model]

    def train_data(shard: Shard) -> StoredImages:
        """The shard's rows of the training set, only those (the split as stored is dropped HOLD_SECONDS
        after the last shard taken from it)."""
        if shard.index >= shard.count:
            raise ValueError(f"shard {shard.index} does not exist; the experiment has {shard.count}")
        images, labels = _split(options.dataset, "train", shard.data_dir)
        indices = _shards(options.dataset, shard.data_dir, shard.count, options.partition, shard.seed,
                          options.classes_per_worker, options.dirichlet_alpha)[shard.index]
        log.debug("shard %d: %d samples, per class %s", shard.index, len(indices),
                  class_summary(labels, [indices], info.num_classes)[0])
        return StoredImages(options.dataset, images[indices], labels[indices])

    def test_data(data_dir: Path | None) -> Examples:
        dataset = load_dataset(options.dataset, "test", data_dir)
        return Examples(dataset.images, dataset.labels)

    def validation_data(shard: Shard) -> Examples:
        """A worker's held-out data for federated evaluation: every count-th test image from its index,
        so the shards' sets together are the test set, and their sample-weighted average accuracy
        over all workers is the test accuracy. Only those images are normalised and kept."""
        images, labels = _split(options.dataset, "test", shard.data_dir)
        rows = slice(shard.index, None, shard.count)
        return Examples(normalised(options.dataset, images[rows]), labels[rows].clone())

    def describe_shards(shards: Sequence[StoredImages]) -> str:
        """Every worker's classes (as partition.txt always showed them)."""
        ends = torch.tensor([len(shard) for shard in shards]).cumsum(0).tolist()
        ranges = [torch.arange(end - len(shard), end) for shard, end in zip(shards, ends)]
        return format_class_summary(torch.cat([shard.targets for shard in shards]), ranges, info.num_classes)

    return Task(
        model=initialised(lambda: factory(info.shape, info.num_classes), options.init),
        train_data=train_data,
        validation_data=validation_data,
        test_data=test_data,
        evaluate=lambda model, data: accuracy_and_loss(model, data, options.eval_batch_size),
        describe_shards=describe_shards,
    )
