"""Which joined workers take part in a round."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_workers(worker_ids: Sequence[int], fraction: float, seed: int, round_number: int) -> list[int]:
    """The workers taking part in one round: round(fraction * K) of them, at least one, drawn
    from a generator seeded by (seed, round), so a resumed server samples what it would have."""
    if not worker_ids:
        return []
    count = max(1, round(fraction * len(worker_ids)))
    rng = np.random.default_rng((seed, round_number))
    return sorted(int(w) for w in rng.choice(list(worker_ids), size=count, replace=False))
