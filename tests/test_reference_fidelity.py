"""The LBGM authors' split and initial weights as options (issue 17): partition = "reference" and
init = "reference" against their code (shams-sam/FedOptim at 381a63e).

The literal digests below come from running their own src/data/distributor.py:29-123 and
src/models/cnn.py, verbatim, under their pins torch 1.4.0 and numpy 1.18.5 (Python 3.8): the
MNIST training labels through DataLoader(shuffle=True, batch_size=60000) as src/init_data.py:31-38
does, then get_distributed_data(..., 100, stratify=True, uniform=True, shuffle=True, non_iid=3,
num_classes=10), with np.random.seed(seed) and torch.manual_seed(seed) first (their script seeds
neither); CNN(1, 800) right after torch.manual_seed(1).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lbgm.experiment.config import ConfigError, ExperimentConfig, load_config
from lbgm.task.loader import BUILTIN_TASK, TaskError, build_model, load_task, seeded
from lbgm.tasks import models
from lbgm.tasks.datasets import load_dataset
from lbgm.tasks.partition import (_reference_class_stacks, _reference_cuts, _reference_loader_order, class_summary,
                                  partition)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_LABELS = DATA / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"


def digest(shards: list[torch.Tensor]) -> str:
    return hashlib.sha256(json.dumps([shard.tolist() for shard in shards]).encode()).hexdigest()


def parameter_digest(model: nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


# --- partition = "reference" -------------------------------------------------------------------

SMALL_LABELS = torch.tensor([0, 1, 2] * 4)  # sample i has class i mod 3


def test_small_split_derived_by_hand_from_the_reference_algorithm():
    """12 samples, 4 workers, 2 classes each, seed 0. The random draws, then the rest by hand:

    loader order (torch 1.4's DataLoader after torch.manual_seed(0); torch 1.4 itself gives it):
        [5, 4, 0, 9, 7, 8, 1, 10, 3, 11, 6, 2]
    after the ten np.random.permutation(12) (distributor.py:57-61), positions -> sample:
        [0, 11, 3, 1, 6, 4, 5, 7, 2, 10, 8, 9]   labels [0, 2, 0, 1, 0, 1, 2, 1, 2, 1, 2, 0]
    each class's samples in that order (torch.where keeps it, distributor.py:84):
        class 0: [0, 3, 6, 9]   class 1: [1, 4, 7, 10]   class 2: [11, 5, 2, 8]
    assign_classes (distributor.py:29-43): the class list is permuted by np.random.permutation(3)
    = [1, 0, 2], [2, 0, 1], [0, 2, 1] in turn, each applied to the previous order:
        [1, 0, 2] -> [2, 1, 0] -> [2, 0, 1];  stream 1 0 | 2 2 | 1 0 | 2 0
        workers (sorted): 0: [0, 1]   1: [2, 2] (dealt class 2 twice)   2: [0, 1]   3: [0, 2]
    holders in node order, a double deal twice (distributor.py:45-48):
        class 0: 0, 2, 3    class 1: 0, 2    class 2: 1, 1, 3
    cuts (distributor.py:100-106): 4 samples in 3 pieces: size 1, 1 left over; crossover [0, 1, 2, 3]
    becomes [1, 2, 3, 4] after crossover[0:] += 1, so the first sample goes to nobody; in 2 pieces:
    [0, 2, 4].
        class 0: 0 dropped, 3 -> w0, 6 -> w2, 9 -> w3
        class 1: 1, 4 -> w0, 7, 10 -> w2
        class 2: 11 dropped, 5 -> w1, 2 -> w1, 8 -> w3
    Their code under torch 1.4.0 gives the same: [[1, 3, 4], [2, 5], [6, 7, 10], [8, 9]].
    """
    assert _reference_loader_order(12, 0).tolist() == [5, 4, 0, 9, 7, 8, 1, 10, 3, 11, 6, 2]
    rng = np.random.RandomState(0)
    order = _reference_loader_order(12, 0).numpy()
    for _ in range(10):
        order = order[rng.permutation(12)]
    assert order.tolist() == [0, 11, 3, 1, 6, 4, 5, 7, 2, 10, 8, 9]
    assert _reference_class_stacks(np.array([0, 1, 2]), 4, 2, rng) == [[0, 1], [2, 2], [0, 1], [0, 2]]
    assert _reference_cuts(4, 3) == [1, 2, 3, 4]
    assert _reference_cuts(4, 2) == [0, 2, 4]
    shards = partition(SMALL_LABELS, 4, "reference", seed=0, classes_per_worker=2)
    assert [shard.tolist() for shard in shards] == [[1, 3, 4], [2, 5], [6, 7, 10], [8, 9]]


def test_cuts_put_leftovers_first_and_drop_the_first_sample_only_when_some_are_left_over():
    assert _reference_cuts(10, 5) == [0, 2, 4, 6, 8, 10]  # divides: nothing lost
    assert _reference_cuts(11, 3) == [1, 5, 8, 11]  # 3 x 3 + 2 left: pieces 4, 3, 3, sample 0 lost


@pytest.mark.skipif(not MNIST_LABELS.exists(), reason="the official MNIST files are not in ../shared/data")
def test_mnist_100_workers_seed_1_is_the_reference_split():
    labels = load_dataset("mnist", "train", DATA).labels
    shards = partition(labels, 100, "reference", seed=1, classes_per_worker=3)
    # their code, torch 1.4.0 / numpy 1.18.5, seeds 1 and 2 (worker w = their node L0_W<w>):
    assert digest(shards) == "00fd7c5656ecfbeb6e85da4735c0b20181f814028a197ccd4e567285f4582a52"
    assert digest(partition(labels, 100, "reference", seed=2, classes_per_worker=3)) == \
        "784d386d7937f73adcf185c00f90d46c346fd73c642ca777bcd3920ef0d3d664"
    per_class = np.array(class_summary(labels, shards, 10))
    sizes = per_class.sum(axis=1)
    assert len(shards) == 100 and (sizes.min(), sizes.max()) == (568, 656)
    assert shards[0][:5].tolist() == [24, 186, 241, 315, 367] and per_class[0].tolist()[:2] == [0, 225]
    # every class loses its first sample (no class size is divisible by its 30 holdings)
    assert (per_class.sum(axis=0) == np.bincount(labels.numpy(), minlength=10) - 1).all()
    held = (per_class > 0).sum(axis=1)
    # 93 workers hold 3 classes; 7 were dealt one class twice and hold 2, one with a double share
    assert np.flatnonzero(held == 2).tolist() == [13, 36, 53, 56, 83, 93, 96] and (held[held != 2] == 3).all()
    assert per_class[13].tolist() == [0, 225, 0, 410, 0, 0, 0, 0, 0, 0]


# --- init = "reference" ------------------------------------------------------------------------

class ReferenceCNN(nn.Module):
    """FedOptim src/models/cnn.py:5-11 as they wrote it (their forward is not needed here)."""

    def __init__(self, nc: int, fs: int, nclasses: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nc, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(fs, 500)
        self.fc2 = nn.Linear(500, nclasses)


def reference_cnn_under_their_seeding(seed: int) -> ReferenceCNN:
    """Their order: torch.manual_seed(args.seed) (src/common/utils.py:50, from train_federated.py:29),
    nothing drawn until src/models/utils.py:55 builds CNN(nc=1, fs=4*4*50) for MNIST."""
    torch.manual_seed(seed)
    return ReferenceCNN(1, 4 * 4 * 50)


TORCH14_CNN_SEED1 = "4afa8fa67c37833e6f7641b94f12a038c5ba363c045168419edb3d347275e1e5"


def test_our_cnn_draws_the_same_numbers_in_the_same_order_as_theirs():
    ours = models.build_model("cnn", 1)
    theirs = reference_cnn_under_their_seeding(1)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_init_reference_is_torch_1_4_bit_for_bit():
    ours = models.build_model("cnn", 1, init="reference")
    theirs = seeded(1, lambda: models.reference_initialised(lambda: ReferenceCNN(1, 800)))
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert parameter_digest(ours) == TORCH14_CNN_SEED1  # their CNN under torch 1.4.0, seed 1
    conv1 = next(ours.parameters()).detach().flatten()[:4].tolist()  # torch 1.4.0's first values, exactly
    assert [float.hex(v) for v in conv1] == ["0x1.a61a840000000p-4", "-0x1.6993ba0000000p-4",
                                             "-0x1.3d9f680000000p-5", "0x1.8081cc0000000p-4"]
    fc2_bias = list(ours.parameters())[7].detach()[:3].tolist()
    assert [float.hex(v) for v in fc2_bias] == ["0x1.a200dc0000000p-6", "0x1.c0e1400000000p-8",
                                                "-0x1.2bff480000000p-7"]
    # today's torch takes the same draws but rounds once in double: 225,456 of 431,080 values differ,
    # each by one float32 rounding
    default = torch.cat([p.detach().flatten() for p in models.build_model("cnn", 1).parameters()])
    reference = torch.cat([p.detach().flatten() for p in ours.parameters()])
    assert int((default != reference).sum()) == 225_456
    assert float((default - reference).abs().max()) <= 1.5e-8


def test_the_server_builds_the_reference_start_from_the_config():
    config = ExperimentConfig(model="cnn", dataset="mnist-embedded", seed=1, init="reference")
    model = build_model(load_task(config.task, config.task_options), config.seed, config.task)
    assert parameter_digest(model) == TORCH14_CNN_SEED1


# --- bad input ---------------------------------------------------------------------------------

def test_unknown_init_or_partition_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"init must be one of \['default', 'reference'\], got 'torch1.4'"):
        ExperimentConfig(init="torch1.4")
    bad = tmp_path / "bad.toml"
    bad.write_text('[experiment]\ninit = "xavier"\n')
    with pytest.raises(ConfigError, match="init must be one of"):
        load_config(bad)
    with pytest.raises(TaskError, match="partition must be one of"):
        load_task(BUILTIN_TASK, ExperimentConfig(partition="fedoptim").task_options)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        models.build_model("cnn", 1, init="xavier")


def test_reference_partition_with_every_class_per_worker_is_refused():
    options = ExperimentConfig(dataset="mnist-embedded", partition="reference", classes_per_worker=10).task_options
    with pytest.raises(TaskError, match="partition reference needs classes_per_worker below the 10 classes"):
        load_task(BUILTIN_TASK, options)
    with pytest.raises(ValueError, match="needs 0 <= seed < 2\\*\\*32, got -1"):
        partition(SMALL_LABELS, 4, "reference", seed=-1, classes_per_worker=2)


def test_reference_init_refuses_layers_it_does_not_know():
    with pytest.raises(ValueError, match="Conv2d, Linear and BatchNorm2d only; the model has parameters in a "
                                         "LayerNorm"):
        models.reference_initialised(lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


def test_cli_refuses_the_mix_in_one_line_with_exit_code_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lbgm.cli", "init-weights", "--out", str(tmp_path / "w"),
                          "--partition", "reference", "--classes-per-worker", "10"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "partition reference needs classes_per_worker below the 10 classes" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
