"""Who the workers are: identity, secret token and data shard of each."""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass


# What `lbgm worker --name` (a host name), its virtual workers (NAME-0, NAME-1 ...) and certificate
# Common Names use. No spaces, quotes, newlines or control characters: a name goes into log lines,
# file names and certificates as it is, and must not be able to forge a line or escape a terminal.
WORKER_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
WORKER_NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ : @ / -"


def check_worker_name(name: str) -> None:
    """Raise ValueError, quoting the name escaped, unless it is a valid worker name."""
    if WORKER_NAME.fullmatch(name) is None:
        shown = repr(name if len(name) <= 64 else name[:64] + "...")
        raise ValueError(f"worker name {shown} ({len(name)} characters) is not {WORKER_NAME_RULE}")


class AuthError(PermissionError):
    """The caller is not the worker it claims to be."""


class FederationFull(RuntimeError):
    """Every data shard already belongs to a worker."""


@dataclass
class WorkerRecord:
    worker_id: int
    name: str
    token: bytes
    shard_index: int
    joined_at: float


class Registry:
    """Thread-safe map of worker ids to records.

    A worker keeps its id and shard across re-joins (same name); each join
    issues a fresh token and invalidates the old one, so a restarted worker
    process takes its slot back and a stale process loses it.
    """

    def __init__(self, num_shards: int) -> None:
        self._num_shards = num_shards
        self._by_id: dict[int, WorkerRecord] = {}
        self._by_name: dict[str, WorkerRecord] = {}
        self._lock = threading.Lock()

    def join(self, name: str) -> tuple[WorkerRecord, bool]:
        """(record, rejoined) for the worker called `name`."""
        check_worker_name(name)
        with self._lock:
            record = self._by_name.get(name)
            rejoined = record is not None
            if record is None:
                if len(self._by_id) >= self._num_shards:
                    raise FederationFull(f"all {self._num_shards} worker slots are taken")
                worker_id = len(self._by_id) + 1
                record = WorkerRecord(worker_id, name, b"", shard_index=worker_id - 1, joined_at=time.time())
                self._by_id[worker_id] = record
                self._by_name[name] = record
            record.token = secrets.token_bytes(16)
            return record, rejoined

    def restore(self, workers: list[tuple[int, str, int]]) -> None:
        """Re-create the slots (id, name, shard) of a checkpoint. Tokens are not kept on disk, so every
        worker must join again: each gets its old id and shard back and a fresh token."""
        with self._lock:
            for worker_id, name, shard_index in workers:
                record = WorkerRecord(worker_id, name, secrets.token_bytes(16), shard_index, joined_at=time.time())
                self._by_id[worker_id] = record
                self._by_name[name] = record

    def slots(self) -> list[tuple[int, str, int]]:
        """(id, name, shard) of every worker, for checkpoints."""
        with self._lock:
            return [(r.worker_id, r.name, r.shard_index) for r in sorted(self._by_id.values(), key=lambda r: r.worker_id)]

    def authenticate(self, worker_id: int, token: bytes) -> WorkerRecord:
        with self._lock:
            record = self._by_id.get(worker_id)
        if record is None:
            raise AuthError(f"unknown worker id {worker_id}; join first")
        if not hmac.compare_digest(record.token, token):
            raise AuthError(f"bad token for worker {worker_id}")
        return record

    def shard_of(self, worker_id: int) -> int:
        with self._lock:
            return self._by_id[worker_id].shard_index

    def name_of(self, worker_id: int) -> str:
        with self._lock:
            return self._by_id[worker_id].name

    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._by_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)
