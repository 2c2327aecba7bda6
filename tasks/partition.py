"""Split a training set among workers, deterministically for a seed.

- iid: a random permutation cut into equal parts (sizes differ by at most 1).
- shards: k classes per worker, the LBGM reference scheme: class labels are
  dealt from a stream of random permutations of all classes, every worker
  holds exactly k distinct classes, and each class's samples are split evenly
  (sizes differing by at most 1) among the workers that hold it. With fewer
  than C/k workers some classes are held by nobody and their samples unused.
- dirichlet: per class, worker proportions drawn from Dirichlet(alpha); the
  draw is repeated (up to 100 times) until no worker is empty.
- reference: the LBGM authors' own split (shams-sam/FedOptim at 381a63e,
  src/data/distributor.py:29-123 as called by src/init_data.py:31-67), draw for
  draw, seeded as that script is not (see `_reference_label_shards`). Unlike
  shards, a worker can be dealt one class twice and then holds fewer than k,
  and each class whose size the holders do not divide loses one sample.

Shards are disjoint, sorted index tensors; the same arguments give the same shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PARTITIONS = ("iid", "shards", "dirichlet", "reference")
MAX_LISTED_CLASSES = 10  # format_class_summary lists at most this many classes per worker
RESHUFFLES = 10  # the reference permutes the whole training set this many times (distributor.py:58)


def partition(
    labels: torch.Tensor,
    num_shards: int,
    scheme: str,
    seed: int,
    classes_per_worker: int = 3,
    alpha: float = 0.5,
) -> list[torch.Tensor]:
    """Sample indices of each of `num_shards` disjoint shards."""
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition {scheme!r}; choose one of {list(PARTITIONS)}")
    if not 1 <= num_shards <= len(labels):
        raise ValueError(f"need 1 <= num_shards <= {len(labels)} samples, got {num_shards}")
    if scheme == "reference":
        shards = _reference_label_shards(labels, num_shards, classes_per_worker, seed)
        return [torch.sort(shard).values for shard in shards]
    rng = np.random.default_rng(seed)
    label_array = labels.numpy()
    if scheme == "iid":
        shards = np.array_split(rng.permutation(len(label_array)), num_shards)
    elif scheme == "shards":
        shards = _label_shards(label_array, num_shards, classes_per_worker, rng)
    else:
        shards = _dirichlet(label_array, num_shards, alpha, rng)
    return [torch.as_tensor(np.sort(shard), dtype=torch.int64) for shard in shards]


def _deal_classes(classes: np.ndarray, num_shards: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Each worker's k distinct classes, dealt from a stream of random permutations of all classes.

    As in the reference code, each worker takes the next k entries of the stream. Where
    that would give a worker a class twice (possible where one permutation ends and the
    next begins), it takes instead the first later entry it does not hold, and the
    skipped entry stays at the head of the stream for the next worker. No entry is
    dropped, so holder counts stay as even as the reference's: the tests check that
    any two classes are held by numbers of workers differing by at most one.
    """
    stream: list[int] = []
    held: list[list[int]] = []
    for _ in range(num_shards):
        mine: list[int] = []
        while len(mine) < k:
            position = next((i for i, label in enumerate(stream) if label not in mine), None)
            if position is None:
                stream.extend(int(label) for label in rng.permutation(classes))
            else:
                mine.append(stream.pop(position))
        held.append(sorted(mine))
    return held


def _label_shards(labels: np.ndarray, num_shards: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ValueError(f"classes_per_worker must lie in [1, {len(classes)}] (the classes present), got {k}")
    held = _deal_classes(classes, num_shards, k, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for label in classes:
        holders = [worker for worker, mine in enumerate(held) if label in mine]
        if not holders:
            continue  # too few workers for every class to be held: its samples stay unused
        members = rng.permutation(np.flatnonzero(labels == label))
        for worker, piece in zip(holders, np.array_split(members, len(holders))):
            parts[worker].append(piece)
    shards = [np.concatenate(pieces) for pieces in parts]
    for worker, shard in enumerate(shards):
        if len(shard) == 0:
            raise ValueError(f"worker {worker} got no samples: its classes {held[worker]} have fewer samples "
                             f"than workers holding them; use fewer workers or more data")
    return shards


def _reference_loader_order(count: int, seed: int) -> torch.Tensor:
    """The order in which torch 1.4's DataLoader(shuffle=True) yields `count` samples after
    torch.manual_seed(seed): its iterator first draws one int64 base seed, then its sampler
    takes torch.randperm(count) (torch 1.4 utils/data/dataloader.py and sampler.py). Checked
    against torch 1.4.0 itself; today's DataLoader draws differently, so it is replayed here."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(count, generator=generator)


def _reference_class_stacks(classes: np.ndarray, num_shards: int, k: int,
                            rng: np.random.RandomState) -> list[list[int]]:
    """Each worker's k classes as the reference's assign_classes deals them (distributor.py:29-43):
    worker w takes entries w*k .. w*k+k-1 of a stream of permutations of all classes, duplicates
    included. A new permutation is drawn whenever one is used up, also after the last entry."""
    stream: list[int] = []
    order = classes[rng.permutation(len(classes))]
    position = 0
    while len(stream) < num_shards * k:
        stream.append(int(order[position]))
        position += 1
        if position == len(order):
            position = 0
            order = order[rng.permutation(len(classes))]
    return [sorted(stream[worker * k:worker * k + k]) for worker in range(num_shards)]


def _reference_cuts(size: int, holdings: int) -> list[int]:
    """Where the reference cuts a class of `size` samples among `holdings` (distributor.py:100-106):
    cuts j * (size // holdings), then for each of the r = size mod holdings leftovers every cut
    from the r-th on moves up by one. Cut j becomes j * (size // holdings) + min(j + 1, r): with
    r > 0 the class's first sample goes to nobody and the first r - 1 pieces get one extra."""
    base, leftovers = divmod(size, holdings)
    return [cut * base + min(cut + 1, leftovers) for cut in range(holdings + 1)]


def _reference_label_shards(labels: torch.Tensor, num_shards: int, k: int, seed: int) -> list[torch.Tensor]:
    """The reference's non-iid split (get_distributed_data with uniform=True, shuffle=True,
    distributor.py:52-123) of the training set in file order, with shard w = its node w (worker
    L0_W<w>, train_federated.py:45, train.py:273-277).

    Its randomness, in its order: the DataLoader's shuffle of the whole set (init_data.py:31-38),
    ten numpy permutations (distributor.py:57-61), then assign_classes' permutations. init_data.py
    seeds neither generator, so its own split changes from run to run; here torch and numpy's
    legacy global generator are taken as seeded with `seed` (np.random.RandomState(seed) draws
    exactly as np.random.seed(seed) would have). Each class's samples, in shuffled order, are cut
    into one piece per holding (a worker dealt the class twice gets two) by `_reference_cuts`."""
    classes = np.unique(labels.numpy())
    if not 1 <= k < len(classes):
        raise ValueError(f"partition reference needs classes_per_worker in [1, {len(classes) - 1}] (fewer than "
                         f"the {len(classes)} classes present; with all of them the reference splits iid with "
                         f"sklearn, which this option does not replay), got {k}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"partition reference seeds numpy's legacy generator and needs 0 <= seed < 2**32, got {seed}")
    rng = np.random.RandomState(seed)
    order = _reference_loader_order(len(labels), seed).numpy()
    for _ in range(RESHUFFLES):
        order = order[rng.permutation(len(order))]
    stacks = _reference_class_stacks(classes, num_shards, k, rng)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    shuffled_labels = labels.numpy()[order]
    for label in classes:
        members = order[shuffled_labels == label]
        holders = [worker for worker, stack in enumerate(stacks) for held in stack if held == label]
        if not holders:
            continue  # dealt to nobody (too few workers): its samples stay unused, as in the reference
        cuts = _reference_cuts(len(members), len(holders))
        for holding, worker in enumerate(holders):
            pieces[worker].append(members[cuts[holding]:cuts[holding + 1]])
    shards = [torch.as_tensor(np.concatenate(worker_pieces), dtype=torch.int64) for worker_pieces in pieces]
    for worker, shard in enumerate(shards):
        if len(shard) == 0:
            raise ValueError(f"worker {worker} got no samples: its classes {stacks[worker]} have fewer samples "
                             f"than workers holding them; use fewer workers or more data")
    return shards


def _dirichlet(labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if not alpha > 0:  # also refuses NaN
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


def format_class_summary(labels: torch.Tensor, shards: Sequence[torch.Tensor], num_classes: int) -> str:
    """A per-worker table, one line each: index, sample count, classes held as class:count.

    A worker holding more than MAX_LISTED_CLASSES classes shows its largest ones and
    the rest as "+N more (M)". A footer gives min/median/max samples and classes per worker.
    """
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"labels reach {int(labels.max())}, but num_classes is {num_classes}")
    counts = np.array(class_summary(labels, shards, num_classes), dtype=np.int64).reshape(len(shards), num_classes)
    sizes = counts.sum(axis=1)
    held = (counts > 0).sum(axis=1)
    index_width = max(len("worker"), len(str(len(shards) - 1)))
    size_width = max(len("samples"), len(str(int(sizes.max(initial=0)))))
    lines = [f"{'worker':>{index_width}}  {'samples':>{size_width}}  classes (class:count)"]
    for worker, row in enumerate(counts):
        present = np.flatnonzero(row)
        shown = present if len(present) <= MAX_LISTED_CLASSES else np.sort(
            present[np.argsort(-row[present], kind="stable")[:MAX_LISTED_CLASSES]])
        cells = [f"{c}:{row[c]}" for c in shown]
        if len(shown) < len(present):
            cells.append(f"+{len(present) - len(shown)} more ({int(sizes[worker] - row[shown].sum())})")
        lines.append(f"{worker:>{index_width}}  {int(sizes[worker]):>{size_width}}  {' '.join(cells) or '-'}")
    lines.append(f"{len(shards)} workers; samples per worker min {_stats(sizes)}; "
                 f"classes per worker min {_stats(held)} (of {num_classes})")
    return "\n".join(lines)


def _stats(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-, median -, max -"
    return f"{int(values.min())}, median {float(np.median(values)):g}, max {int(values.max())}"
