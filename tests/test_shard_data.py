"""The built-in task loads only a shard's rows (issue 18), keeps them as stored (uint8) and normalises
minibatches: the same tensors as slicing the whole normalised set, and a process that loaded one shard
keeps none of the rest."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lbgm.task import Shard, TaskOptions
from lbgm.tasks import image
from lbgm.tasks.datasets import load_dataset
from lbgm.tasks.partition import partition

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_SETS = [("mnist-embedded", None),
             pytest.param("mnist", SHARED_DATA, marks=pytest.mark.skipif(
                 not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"no official MNIST files in {SHARED_DATA}"))]


@pytest.mark.parametrize("dataset, data_dir", DATA_SETS)
@pytest.mark.parametrize("scheme", ["shards", "dirichlet"])
def test_shards_and_validation_sets_equal_the_rows_of_the_whole_normalised_set(dataset, data_dir, scheme):
    workers, seed = 7, 3
    options = TaskOptions(dataset=dataset, model="cnn", partition=scheme, classes_per_worker=3)
    task = image.classification(options)
    train, test = load_dataset(dataset, "train", data_dir), load_dataset(dataset, "test", data_dir)
    rows = partition(train.labels, workers, scheme, seed, classes_per_worker=3, alpha=options.dirichlet_alpha)
    for index in range(workers):
        shard = Shard(index, workers, seed, data_dir)
        data = task.train_data(shard)
        whole = torch.arange(len(data))
        picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(index))[:32]
        for batch in (whole, picked):  # a whole-shard batch (batch_size 0) and a minibatch
            inputs, targets = data.batch(batch)
            assert torch.equal(inputs, train.images[rows[index][batch]])
            assert torch.equal(targets, train.labels[rows[index][batch]])
        assert inputs.dtype == torch.float32 and data.pixels.dtype == torch.uint8
        held_out = task.validation_data(shard)
        assert torch.equal(held_out.inputs, test.images[index::workers])
        assert torch.equal(held_out.targets, test.labels[index::workers])
        assert held_out.inputs.dtype == torch.float32


def test_a_split_is_read_once_while_shards_load_and_dropped_after_the_hold():
    reads = []

    def read():
        reads.append(1)
        return torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)

    recent = image.RecentSplits(hold_seconds=0.3)
    first = recent.get("key", read)
    time.sleep(0.2)
    assert recent.get("key", read) is first and len(reads) == 1  # each use restarts the hold
    time.sleep(0.2)
    assert recent.held() == ["key"]
    time.sleep(0.4)
    assert recent.held() == []
    recent.get("key", read)
    assert len(reads) == 2


PROBE = """
import sys, time
from pathlib import Path
from lbgm.task import Shard, TaskOptions
from lbgm.tasks import image

def anonymous_bytes():
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) * 1024

image._recent.hold_seconds = 0.5
task = image.classification(TaskOptions(dataset=sys.argv[1], model="cnn", partition="shards"))
data_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else None
before = anonymous_bytes()
data = task.train_data(Shard(0, 10, 0, data_dir))
time.sleep(1.0)
print(anonymous_bytes() - before, data.pixels.nbytes + data.targets.nbytes)
"""


@pytest.mark.parametrize("dataset, data_dir", DATA_SETS)
def test_a_process_that_loaded_one_shard_of_ten_holds_about_that_shard(dataset, data_dir):
    """Before issue 18 every process kept the whole normalised training set (188 MB for MNIST); now a shard
    of a tenth of it is a tenth of the stored (uint8) set."""
    args = [dataset, *([str(data_dir)] if data_dir else [])]
    grown, shard_bytes = map(int, subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                                                 text=True, check=True, timeout=120).stdout.split())
    whole_set = load_dataset(dataset, "train", data_dir).images.nbytes
    assert shard_bytes < whole_set / 4 / 5  # uint8 pixels: a quarter of the float32 bytes
    assert grown < shard_bytes + whole_set / 16, (grown, shard_bytes, whole_set)  # not even the stored set
