"""Partitions of a training set among workers: iid, label shards (the LBGM reference), Dirichlet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lbgm.tasks.partition import PARTITIONS, class_summary, format_class_summary, partition


def skewed_labels(num_classes: int = 10, size: int = 6000, seed: int = 0) -> torch.Tensor:
    """Labels with unequal class sizes, like a real data set."""
    weights = np.linspace(1.0, 2.0, num_classes)
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.choice(num_classes, size=size, p=weights / weights.sum()), dtype=torch.int64)


LABELS = skewed_labels()


def counts(labels: torch.Tensor, shards: list[torch.Tensor], num_classes: int = 10) -> np.ndarray:
    return np.array(class_summary(labels, shards, num_classes))


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_shards_are_disjoint_sorted_index_tensors(scheme):
    shards = partition(LABELS, 20, scheme, seed=1)
    assert len(shards) == 20
    joined = torch.cat(shards)
    assert len(torch.unique(joined)) == len(joined)
    assert all(s.dtype == torch.int64 and torch.equal(s, torch.sort(s).values) for s in shards)
    assert 0 <= int(joined.min()) and int(joined.max()) < len(LABELS)


@pytest.mark.parametrize("scheme", [s for s in PARTITIONS if s != "reference"])  # reference: its off-by-one
def test_every_sample_is_used_when_every_class_is_held(scheme):  # drops samples, tests/test_reference_fidelity.py
    shards = partition(LABELS, 20, scheme, seed=1)  # 20 workers x 3 classes cover all 10 classes
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_same_seed_same_shards_other_seed_other_shards(scheme):
    first = partition(LABELS, 10, scheme, seed=7)
    again = partition(LABELS, 10, scheme, seed=7)
    other = partition(LABELS, 10, scheme, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(s) for s in partition(LABELS, 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(LABELS)


@pytest.mark.parametrize("workers, k", [(100, 3), (10, 3), (7, 3), (33, 7), (20, 10), (15, 1)])
def test_label_shards_give_each_worker_exactly_k_classes_split_evenly(workers, k):
    per_class = counts(LABELS, partition(LABELS, workers, "shards", seed=3, classes_per_worker=k))
    assert ((per_class > 0).sum(axis=1) == k).all()
    class_sizes = np.bincount(LABELS.numpy(), minlength=10)
    for label in range(10):
        pieces = per_class[:, label][per_class[:, label] > 0]
        if len(pieces):  # every holder's piece of a class differs by at most 1 from the others
            assert pieces.max() - pieces.min() <= 1 and pieces.sum() == class_sizes[label]


@pytest.mark.parametrize("workers, k", [(100, 3), (7, 3), (13, 4), (33, 7), (51, 9)])
def test_label_shards_deal_classes_as_evenly_as_possible(workers, k):
    """Classes come from a stream of permutations: holder counts differ by at most one."""
    for seed in range(5):
        holders = (counts(LABELS, partition(LABELS, workers, "shards", seed, classes_per_worker=k)) > 0).sum(axis=0)
        assert holders.max() - holders.min() <= 1 and holders.sum() == workers * k


def test_label_shards_with_too_few_workers_leave_unheld_classes_unused():
    shards = partition(LABELS, 2, "shards", seed=0, classes_per_worker=3)
    held = (counts(LABELS, shards) > 0).sum(axis=0)
    assert held.sum() == 6 and len(torch.cat(shards)) == int(np.bincount(LABELS.numpy())[held > 0].sum())


def test_smaller_dirichlet_alpha_gives_more_skewed_shards():
    def mean_major_classes(alpha: float) -> float:
        shards = partition(LABELS, 20, "dirichlet", seed=0, alpha=alpha)
        per_class = counts(LABELS, shards)
        assert (per_class.sum(axis=1) > 0).all()  # every worker non-empty
        share = per_class / per_class.sum(axis=1, keepdims=True)
        return float((share > 0.05).sum(axis=1).mean())

    skewed, medium, even = mean_major_classes(0.1), mean_major_classes(1.0), mean_major_classes(100.0)
    assert skewed < medium < even
    assert even > 9.5  # nearly every worker holds every class


@pytest.mark.parametrize("kwargs, named", [
    (dict(num_shards=0, scheme="iid"), "0"),
    (dict(num_shards=6001, scheme="iid"), "6001"),
    (dict(num_shards=5, scheme="random"), "'random'"),
    (dict(num_shards=5, scheme="shards", classes_per_worker=0), "got 0"),
    (dict(num_shards=5, scheme="shards", classes_per_worker=11), "got 11"),
    (dict(num_shards=5, scheme="dirichlet", alpha=0.0), "got 0.0"),
    (dict(num_shards=5, scheme="dirichlet", alpha=float("nan")), "got nan"),
])
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, named):
    with pytest.raises(ValueError) as error:
        partition(LABELS, seed=0, **kwargs)
    assert named in str(error.value)


def test_labels_must_be_a_vector_of_integers():
    with pytest.raises(ValueError, match="1-D integer"):
        partition(LABELS.to(torch.float32), 5, "iid", seed=0)


def test_dirichlet_that_keeps_leaving_a_worker_empty_says_so():
    with pytest.raises(ValueError, match="without data"):
        partition(torch.zeros(30, dtype=torch.int64), 25, "dirichlet", seed=0, alpha=0.01)


def test_format_class_summary_has_a_line_per_worker_and_a_footer():
    shards = partition(LABELS, 100, "shards", seed=0, classes_per_worker=3)
    text = format_class_summary(LABELS, shards, 10)
    lines = text.splitlines()
    assert len(lines) == 1 + 100 + 1
    sizes = [len(s) for s in shards]
    for worker, (line, shard) in enumerate(zip(lines[1:-1], shards)):
        fields = line.split()
        assert fields[:2] == [str(worker), str(len(shard))]
        assert len(fields[2:]) == 3  # three "class:count" cells
    assert lines[-1] == (f"100 workers; samples per worker min {min(sizes)}, median {np.median(sizes):g}, "
                         f"max {max(sizes)}; classes per worker min 3, median 3, max 3 (of 10)")


def test_format_class_summary_caps_long_class_lists():
    labels = skewed_labels(num_classes=100, size=5000)
    text = format_class_summary(labels, partition(labels, 4, "iid", seed=0), 100)
    first_worker = text.splitlines()[1]
    assert first_worker.count(":") == 10 and "+90 more" in first_worker
    assert len(first_worker) < 120


def test_format_class_summary_is_deterministic():
    shards = partition(LABELS, 10, "dirichlet", seed=4)
    assert format_class_summary(LABELS, shards, 10) == format_class_summary(LABELS, shards, 10)
