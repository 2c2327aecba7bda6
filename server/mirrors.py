"""The server's copy of every worker's look-back gradients (LBGs).

Invariant: the entry for (worker, unit) is bit-identical to that worker's own
LBG, because both sides store the tensor exactly as it travelled. Entries are
replaced, never mutated, so a reader never sees a half-written LBG.
"""

from __future__ import annotations

import threading
from lbgm.common.lookback import LookbackGradient


class MirrorStore:
    def __init__(self) -> None:
        self._entries: dict[int, dict[int, LookbackGradient]] = {}
        self._lock = threading.Lock()

    def get(self, worker_id: int, unit: int) -> LookbackGradient | None:
        with self._lock:
            return self._entries.get(worker_id, {}).get(unit)

    def of_worker(self, worker_id: int) -> dict[int, LookbackGradient]:
        with self._lock:
            return dict(self._entries.get(worker_id, {}))

    def replace(self, worker_id: int, updates: dict[int, LookbackGradient]) -> None:
        """Install all of one worker's new LBGs at once."""
        with self._lock:
            self._entries.setdefault(worker_id, {}).update(updates)

    def versions(self, worker_id: int) -> dict[int, int]:
        return {unit: entry.version for unit, entry in self.of_worker(worker_id).items()}

    def nbytes(self) -> int:
        with self._lock:
            return sum(
                t.numel() * t.element_size()
                for entries in self._entries.values()
                for entry in entries.values()
                for t in entry.tensors
            )
