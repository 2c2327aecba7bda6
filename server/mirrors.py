"""The server's copy of every worker's look-back gradients (LBGs).

Invariant: the entry for (worker, unit) is bit-identical to that worker's own
LBG, because both sides store the tensor exactly as it travelled. Entries are
replaced, never mutated, so a reader never sees a half-written LBG.

Two stores keep them (`lbgm server --mirrors`): `MirrorStore` in RAM (the
default), and `DiskMirrorStore`, one file per entry, memory-mapped only while
an upload is judged, so RAM holds the open round's uploads, not K model copies.
Both give the same digest for the same entries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lbgm.common.lookback import LookbackGradient
from lbgm.common.state_files import content_digest, save_atomic
from lbgm.server import MIRROR_STORES

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LbgFile:
    """One mirror entry as files name it (checkpoint manifests and the disk store)."""

    worker_id: int
    unit: int
    version: int
    digest: str  # SHA-256 of the tensors (content_digest)

    @property
    def name(self) -> str:
        # The digest's prefix: two different tensors never share a name, even when a round redone after a
        # crash gives the same (worker, unit, version) another content.
        return f"w{self.worker_id}-u{self.unit}-v{self.version}-{self.digest[:16]}.pt"


@dataclass(frozen=True)
class StoredLbg:
    """A mirror entry held in a complete file (written to a temporary name, then renamed): what the
    disk store and a checkpoint loaded without its tensors hold instead of the tensors."""

    file: LbgFile
    path: Path
    nbytes: int  # bytes of its tensors

    @property
    def version(self) -> int:
        return self.file.version

    def read(self) -> LookbackGradient:
        """The entry's tensors, memory-mapped: pages come from the file (page cache) as they are read,
        and the mapping ends with the last reference to them."""
        tensors = torch.load(self.path, mmap=True, weights_only=True)
        return LookbackGradient(tuple(tensors), self.file.version)


MirrorEntry = LookbackGradient | StoredLbg  # what a checkpoint is given to save for one entry


def tensor_bytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def combined_digest(entries: list[tuple[int, int, int, str]]) -> bytes:
    """SHA-256 over (worker, unit, version, tensor digest) of every entry, in order: the same for both
    stores when they hold the same tensors."""
    combined = hashlib.sha256()
    for worker_id, unit, version, digest in sorted(entries):
        combined.update(repr((worker_id, unit, version)).encode())
        combined.update(digest.encode())
    return combined.digest()


class Mirrors(Protocol):
    """What the round driver, the upload judge and checkpoints need of a mirror store."""

    in_ram: bool  # whether every entry's tensors stay in RAM

    def of_worker(self, worker_id: int) -> dict[int, LookbackGradient]: ...

    def replace(self, worker_id: int, updates: dict[int, LookbackGradient]) -> None: ...

    def restore(self, worker_id: int, entries: dict[int, MirrorEntry]) -> None: ...

    def for_checkpoint(self, worker_id: int) -> dict[int, MirrorEntry]: ...

    def digest(self) -> bytes: ...

    def versions(self, worker_id: int) -> dict[int, int]: ...

    def nbytes(self) -> int: ...


class MirrorStore:
    """Every entry in RAM: K model copies once every worker has sent each layer in full."""

    in_ram = True

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

    def restore(self, worker_id: int, entries: dict[int, MirrorEntry]) -> None:
        """Install entries from a checkpoint (files are read whole into RAM)."""
        self.replace(worker_id, {unit: entry.read() if isinstance(entry, StoredLbg) else entry
                                 for unit, entry in entries.items()})

    def for_checkpoint(self, worker_id: int) -> dict[int, MirrorEntry]:
        return self.of_worker(worker_id)

    def digest(self) -> bytes:
        """SHA-256 over every entry's worker, unit, version and tensors, in order. An entry's tensors are
        hashed the first time a digest needs them and remembered until the entry is replaced, so asking
        again costs a pass over the entries' digests, not over K model copies."""
        with self._lock:
            entries = [((worker_id, unit), entry) for worker_id in sorted(self._entries)
                       for unit, entry in sorted(self._entries[worker_id].items())]
            known = dict(self._digests)
        hashed = []
        for key, entry in entries:
            cached = known.get(key)
            if cached is None or cached[0] is not entry:
                cached = (entry, content_digest(entry.tensors))
                with self._lock:
                    if self._entries.get(key[0], {}).get(key[1]) is entry:
                        self._digests[key] = cached
            hashed.append((*key, entry.version, cached[1]))
        return combined_digest(hashed)

    def versions(self, worker_id: int) -> dict[int, int]:
        return {unit: entry.version for unit, entry in self.of_worker(worker_id).items()}

    def nbytes(self) -> int:
        with self._lock:
            return sum(tensor_bytes(entry.tensors) for entries in self._entries.values() for entry in entries.values())


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` a complete copy of the immutable file `source`: a hard link (no bytes copied) where
    the file system has them, else a copy under a temporary name renamed into place."""
    temporary = target.with_name(target.name + ".tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def make_durable(path: Path) -> None:
    """fsync a file written without it, so that a manifest naming it can be committed."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class DiskMirrorStore:
    """Every entry in its own file under `directory`, written once per version; RAM holds only the index
    (worker, unit, version, digest, size) and the mappings of the entries being read.

    A new entry's file is written to a temporary name and renamed before the index refers to it, and
    the file of the entry it replaces is deleted right after. Files are not fsynced when written: the
    directory is rebuilt from the checkpoint on a resume (never trusted after a crash), and a checkpoint
    fsyncs each file it links before its manifest names it.
    """

    in_ram = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._index: dict[int, dict[int, StoredLbg]] = {}
        self._lock = threading.Lock()
        if directory.exists():  # a previous run's, or a crashed one's: a resume links its files again
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    def of_worker(self, worker_id: int) -> dict[int, LookbackGradient]:
        """The worker's entries, memory-mapped from their files."""
        with self._lock:
            stored = dict(self._index.get(worker_id, {}))
        return {unit: entry.read() for unit, entry in stored.items()}

    def replace(self, worker_id: int, updates: dict[int, LookbackGradient]) -> None:
        """Write each new LBG to its own file, then install all of them at once and delete the files of
        the entries they replace."""
        written = {unit: self._write(LbgFile(worker_id, unit, lbg.version, content_digest(lbg.tensors)), lbg.tensors)
                   for unit, lbg in updates.items()}
        self._install(worker_id, written)

    def restore(self, worker_id: int, entries: dict[int, MirrorEntry]) -> None:
        """Install entries from a checkpoint: its files are linked, not copied (tensors given in RAM are
        written)."""
        installed = {}
        for unit, entry in entries.items():
            if isinstance(entry, StoredLbg):
                path = self.directory / entry.file.name
                link_or_copy(entry.path, path)
                installed[unit] = StoredLbg(entry.file, path, entry.nbytes)
            else:
                installed[unit] = self._write(LbgFile(worker_id, unit, entry.version, content_digest(entry.tensors)),
                                              entry.tensors)
        self._install(worker_id, installed)

    def for_checkpoint(self, worker_id: int) -> dict[int, MirrorEntry]:
        with self._lock:
            return dict(self._index.get(worker_id, {}))

    def digest(self) -> bytes:
        """The same digest as MirrorStore's for the same entries, from the digests taken when each file was
        written: no file is read."""
        with self._lock:
            return combined_digest([(w, u, e.file.version, e.file.digest)
                                    for w, entries in self._index.items() for u, e in entries.items()])

    def versions(self, worker_id: int) -> dict[int, int]:
        with self._lock:
            return {unit: entry.version for unit, entry in self._index.get(worker_id, {}).items()}

    def nbytes(self) -> int:
        """Bytes of the entries' tensors, all on disk."""
        with self._lock:
            return sum(entry.nbytes for entries in self._index.values() for entry in entries.values())

    def _write(self, file: LbgFile, tensors: tuple[torch.Tensor, ...]) -> StoredLbg:
        path = self.directory / file.name
        save_atomic(path, list(tensors), durable=False)
        return StoredLbg(file, path, tensor_bytes(tensors))

    def _install(self, worker_id: int, installed: dict[int, StoredLbg]) -> None:
        with self._lock:
            entries = self._index.setdefault(worker_id, {})
            replaced = [entries[unit].path for unit in installed if unit in entries]
            entries.update(installed)
        current = {entry.path for entry in installed.values()}
        for path in replaced:
            if path not in current:  # a redone round may give a replaced entry the same file name
                path.unlink(missing_ok=True)


def mirror_store(kind: str, run_dir: Path) -> Mirrors:
    """The store `lbgm server --mirrors KIND` keeps the mirrors in; disk: under <run>/mirrors/."""
    if kind == "memory":
        return MirrorStore()
    if kind == "disk":
        return DiskMirrorStore(run_dir / "mirrors")
    raise ValueError(f"mirrors must be one of {', '.join(MIRROR_STORES)}, got {kind!r}")
