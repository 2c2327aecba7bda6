"""The server's copy of every worker's look-back gradients (LBGs).

Invariant: the entry for (worker, unit) is bit-identical to that worker's own
LBG, because both sides store the tensor exactly as it travelled. Entries are
replaced, never mutated, so a reader never sees a half-written LBG.
"""

from __future__ import annotations

import hashlib
import threading

from lbgm.common.lookback import LookbackGradient
from lbgm.common.state_files import content_digest


class MirrorStore:
    def __init__(self) -> None:
        self._entries: dict[int, dict[int, LookbackGradient]] = {}
        # (worker, unit) -> (entry, digest of its tensors): each entry is hashed at most once while installed.
        self._digests: dict[tuple[int, int], tuple[LookbackGradient, str]] = {}
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
            for unit in updates:
                self._digests.pop((worker_id, unit), None)

    def digest(self) -> bytes:
        """SHA-256 over every entry's worker, unit, version and tensors, in order. An entry's tensors are
        hashed the first time a digest needs them and remembered until the entry is replaced, so asking
        again costs a pass over the entries' digests, not over K model copies."""
        with self._lock:
            entries = [((worker_id, unit), entry) for worker_id in sorted(self._entries)
                       for unit, entry in sorted(self._entries[worker_id].items())]
            known = dict(self._digests)
        combined = hashlib.sha256()
        for key, entry in entries:
            cached = known.get(key)
            if cached is None or cached[0] is not entry:
                cached = (entry, content_digest(entry.tensors))
                with self._lock:
                    if self._entries.get(key[0], {}).get(key[1]) is entry:
                        self._digests[key] = cached
            combined.update(repr((*key, entry.version)).encode())
            combined.update(cached[1].encode())
        return combined.digest()

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
