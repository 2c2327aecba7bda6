"""Resumable server checkpoints, written after every `checkpoint_every` completed rounds.

Layout of `<run>/checkpoint/`:

    lbg/w<worker>-u<unit>-v<version>-<sha16>.pt   one file per LBG mirror entry
    manifest.pt                                   everything else, and which LBG files are current

The manifest is the commit point and the only thing trusted: it names every
current LBG file with the SHA-256 of its tensors, and loading checks each file
against it. A file's name carries its version and the first 16 hex digits of
that digest, so two different tensors never share a name, even when a round
redone after a crash gives the same (worker, unit, version) another content.

A save writes an LBG file unless the committed manifest already names that
file with the same digest (a mirror entry is immutable once written, so
scalar-only rounds cost no LBG I/O). Mirrors kept on disk (`--mirrors disk`,
lbgm.server.mirrors.DiskMirrorStore) are hard-linked from their files and
fsynced instead of written again, and a resume links the checkpoint's files
back into that store without reading them into RAM. Files go first (temporary name, fsync,
rename), then the manifest is replaced the same way, then every file the new
manifest does not name is deleted: those of earlier rounds and any left by a
checkpoint that crashed or failed before its manifest (loading deletes them
too). A crash at any moment therefore leaves either the previous complete
checkpoint or the new one.

On disk a checkpoint is about (K x LBG units + 2) model copies: every
worker's mirrors, the global model and the server momentum (with disk mirrors
the LBG files share their blocks with the mirror store's files).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lbgm.experiment.config import FIELDS, ExperimentConfig
from lbgm.common.lookback import LookbackGradient
from lbgm.common.faults import crash_point
from lbgm.common.state_files import content_digest, load, save_atomic
from lbgm.server.mirrors import LbgFile, MirrorEntry, StoredLbg, link_or_copy, make_durable, tensor_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: LBG files named and verified by content digest; last accepted round per worker
# Settings a resumed run may change: where data lives and how the server is operated (including how
# often the workers evaluate and how many samples one may claim), plus the round count (to extend a
# finished run). Every other field defines the experiment and must match.
RESUMABLE_CHANGES = frozenset({"data_dir", "round_timeout", "checkpoint_every", "eval_batch_size", "min_workers",
                               "rounds", "federated_eval_every", "max_worker_samples"})


class CheckpointError(RuntimeError):
    """No usable checkpoint: missing, unreadable, damaged, or written by a different experiment."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is still committed."""


@dataclass
class ServerState:
    """Everything the server needs to continue after round `completed_rounds`."""

    completed_rounds: int
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    velocity: list[torch.Tensor] | None
    workers: list[tuple[int, str, int]]  # (id, name, shard) of every registered worker
    mirrors: dict[int, dict[int, MirrorEntry]]  # worker id -> unit -> LBG (its tensors, or its file)
    last_accepted: dict[int, int]  # worker id -> last round whose upload from it was aggregated
    metrics: list[dict[str, Any]]  # the per-round records so far
    totals: dict[str, int]  # uplink / downlink bytes so far
    elapsed_seconds: float
    downlink: dict | None = None  # update mode: the downlink's state (lbgm.common.downlink.state_to_dict)


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest_path = directory / "manifest.pt"
        self.lbg_dir = directory / "lbg"
        self._committed: dict[str, str] | None = None  # LBG file name -> digest, as the committed manifest has it
        self._digests: dict[tuple[int, int], tuple[LookbackGradient, str]] = {}  # each immutable entry hashed once

    @classmethod
    def of_run(cls, run_dir: Path) -> CheckpointStore:
        return cls(run_dir / "checkpoint")

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def resumable_round(self, config: ExperimentConfig) -> int | None:
        """The rounds completed by a readable checkpoint of exactly this experiment, else None: lets
        `lbgm sweep` continue an interrupted run instead of starting it again."""
        manifest = self._read_manifest()
        if manifest is None or config_differences(manifest["config"], dataclasses.asdict(config)):
            return None
        return int(manifest["completed_rounds"])

    def clear(self) -> None:
        """Forget a previous run's checkpoint (a fresh run must not inherit its LBG files)."""
        if self.directory.exists():
            log.info("starting afresh: removing the previous checkpoint in %s", self.directory)
            shutil.rmtree(self.directory)
        self._committed = {}

    def save(self, state: ServerState, config: ExperimentConfig) -> int:
        """Write a checkpoint of `state`; returns the bytes of LBG files written this time (files linked
        from a disk mirror store are not written again: they count 0).

        On an OSError (a full disk) the files this attempt wrote are removed and the error, which
        names the file, is raised: the previous checkpoint stays the committed one.
        """
        committed = self._committed_files()
        self.lbg_dir.mkdir(parents=True, exist_ok=True)
        crash_point("checkpoint.begin")
        files = [self._lbg_file(worker_id, unit, entry)
                 for worker_id, entries in state.mirrors.items() for unit, entry in entries.items()]
        written = 0
        try:
            for file in files:
                if committed.get(file.name) == file.digest:
                    continue
                crash_point("checkpoint.lbg.begin")
                entry = state.mirrors[file.worker_id][file.unit]
                if isinstance(entry, StoredLbg):
                    link_or_copy(entry.path, self.lbg_dir / file.name)
                    make_durable(self.lbg_dir / file.name)
                else:
                    save_atomic(self.lbg_dir / file.name, list(entry.tensors), crash_label="checkpoint.lbg")
                    written += tensor_bytes(entry.tensors)
            manifest = {
                "format": FORMAT_VERSION,
                "config": dataclasses.asdict(config),
                "completed_rounds": state.completed_rounds,
                "params": state.params,
                "buffers": state.buffers,
                "velocity": state.velocity,
                "workers": state.workers,
                "lbg_files": [dataclasses.astuple(file) for file in files],
                "last_accepted": sorted(state.last_accepted.items()),
                "metrics": state.metrics,
                "totals": state.totals,
                "elapsed_seconds": state.elapsed_seconds,
                "downlink": state.downlink,
            }
            save_atomic(self.manifest_path, manifest, crash_label="checkpoint.manifest")
        except OSError:
            self._delete_orphans()
            raise
        self._committed = {file.name: file.digest for file in files}
        self._delete_orphans()
        return written

    def load(self, config: ExperimentConfig, tensors: bool = True) -> ServerState:
        """The last committed checkpoint, checked against the experiment about to resume; every LBG
        file is checked against the digest the manifest recorded for it. Files the manifest does not
        name (left by a save that crashed after its commit or before it) are deleted. Without
        `tensors` the mirrors come as their files (StoredLbg), read memory-mapped for the check only."""
        if not self.exists():
            raise CheckpointError(f"no checkpoint to resume from: {self.manifest_path} does not exist")
        try:
            manifest = load(self.manifest_path)
        except Exception as error:  # noqa: BLE001 - any unreadable manifest means the same to the user
            raise CheckpointError(f"cannot read checkpoint {self.manifest_path}: {error}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{self.manifest_path} has format {manifest.get('format')!r}, "
                                  f"this server reads format {FORMAT_VERSION}")
        differences = config_differences(manifest["config"], dataclasses.asdict(config))
        if differences:
            raise CheckpointError(f"the checkpoint in {self.directory} belongs to a different experiment: "
                                  + "; ".join(differences))
        files = [LbgFile(*fields) for fields in manifest["lbg_files"]]
        mirrors: dict[int, dict[int, LookbackGradient]] = {}
        for file in files:
            verified = self._verified_tensors(file, mmap=not tensors)
            if tensors:
                entry = LookbackGradient(verified, file.version)
                self._digests[file.worker_id, file.unit] = (entry, file.digest)
            else:
                entry = StoredLbg(file, self.lbg_dir / file.name, tensor_bytes(verified))
            mirrors.setdefault(file.worker_id, {})[file.unit] = entry
        self._committed = {file.name: file.digest for file in files}
        self._delete_orphans()
        return ServerState(
            completed_rounds=manifest["completed_rounds"],
            params=manifest["params"],
            buffers=manifest["buffers"],
            velocity=manifest["velocity"],
            workers=[tuple(worker) for worker in manifest["workers"]],
            mirrors=mirrors,
            last_accepted=dict(manifest["last_accepted"]),
            metrics=manifest["metrics"],
            totals=manifest["totals"],
            elapsed_seconds=manifest["elapsed_seconds"],
            downlink=manifest.get("downlink"),
        )

    def _verified_tensors(self, file: LbgFile, mmap: bool = False) -> tuple[torch.Tensor, ...]:
        path = self.lbg_dir / file.name
        try:
            tensors = tuple(torch.load(path, mmap=True, weights_only=True) if mmap else load(path))
            digest = content_digest(tensors)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"checkpoint is missing or cannot read LBG file {path}: {error}") from None
        if digest != file.digest:
            raise CheckpointError(f"LBG file {path} is damaged: its tensors have SHA-256 {digest}, the manifest "
                                  f"recorded {file.digest}")
        return tensors

    def _lbg_file(self, worker_id: int, unit: int, lbg: MirrorEntry) -> LbgFile:
        if isinstance(lbg, StoredLbg):  # hashed when its file was written
            return lbg.file
        cached = self._digests.get((worker_id, unit))
        if cached is None or cached[0] is not lbg:
            cached = (lbg, content_digest(lbg.tensors))
            self._digests[worker_id, unit] = cached
        return LbgFile(worker_id, unit, lbg.version, cached[1])

    def _read_manifest(self) -> dict[str, Any] | None:
        """The manifest on disk if it is readable and of this format, else None."""
        if not self.exists():
            return None
        try:
            manifest = load(self.manifest_path)
        except Exception:  # noqa: BLE001 - unreadable means "nothing committed we can use"
            return None
        return manifest if manifest.get("format") == FORMAT_VERSION else None

    def _committed_files(self) -> dict[str, str]:
        """LBG file name -> digest of what the committed manifest names (nothing else on disk is trusted)."""
        if self._committed is None:
            manifest = self._read_manifest()
            files = [LbgFile(*fields) for fields in manifest["lbg_files"]] if manifest else []
            self._committed = {file.name: file.digest for file in files}
        return self._committed

    def _delete_orphans(self) -> None:
        """Delete every LBG file or temporary the committed manifest does not name."""
        keep = self._committed_files()
        self.directory.joinpath(self.manifest_path.name + ".tmp").unlink(missing_ok=True)
        for path in sorted(self.lbg_dir.iterdir()) if self.lbg_dir.exists() else ():
            if path.name not in keep:
                path.unlink(missing_ok=True)
                crash_point("checkpoint.orphan.deleted")


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Experiment-defining settings that differ between a checkpoint and the config resuming it. A setting
    the checkpoint lacks was added since it was written: it had the default's behaviour (e.g. downlink_delta)."""
    saved = {**{name: spec.default for name, spec in FIELDS.items() if name not in saved}, **saved}
    return [f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
            for key in sorted(saved.keys() | current.keys())
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]
