"""Resumable server checkpoints, written after every completed round.

Layout of `<run>/checkpoint/`:

    lbg/w<worker>-u<unit>-v<version>.pt   one file per LBG mirror entry
    manifest.pt                           everything else, and which LBG files are current

An LBG file's name carries its version, and a mirror entry is immutable once
written (a new full upload makes a new version, never an edit), so a round
writes only the entries that changed since the last checkpoint: scalar
uploads cost no checkpoint I/O at all. The manifest is the commit point: it
is replaced atomically, LBG files it names are written (and fsynced) before
it, and files it no longer names are deleted only after it. A crash at any
moment therefore leaves either the previous complete checkpoint or the new
one, never a mixture.

On disk a checkpoint is about (K x LBG units + 2) model copies: every
worker's mirrors, the global model and the server momentum.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lbgm.common.config import ExperimentConfig
from lbgm.common.lookback import LookbackGradient
from lbgm.common.state_files import load, save_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Settings a resumed run may change: where data lives and how the server is operated, plus the
# round count (to extend a finished run). Every other field defines the experiment and must match.
RESUMABLE_CHANGES = frozenset({"data_dir", "round_timeout", "checkpoint_every", "eval_batch_size", "min_workers",
                               "rounds"})


class CheckpointError(RuntimeError):
    """No usable checkpoint: missing, unreadable, or written by a different experiment."""


@dataclass
class ServerState:
    """Everything the server needs to continue after round `completed_rounds`."""

    completed_rounds: int
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    velocity: list[torch.Tensor] | None
    workers: list[tuple[int, str, int]]  # (id, name, shard) of every registered worker
    mirrors: dict[int, dict[int, LookbackGradient]]  # worker id -> unit -> LBG
    metrics: list[dict[str, Any]]  # the per-round records so far
    totals: dict[str, int]  # uplink / downlink bytes so far
    elapsed_seconds: float


def lbg_file_name(worker_id: int, unit: int, version: int) -> str:
    return f"w{worker_id}-u{unit}-v{version}.pt"


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest_path = directory / "manifest.pt"
        self.lbg_dir = directory / "lbg"

    @classmethod
    def of_run(cls, run_dir: Path) -> CheckpointStore:
        return cls(run_dir / "checkpoint")

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def resumable_round(self, config: ExperimentConfig) -> int | None:
        """The rounds completed by a readable checkpoint of exactly this experiment, else None: lets
        `lbgm sweep` continue an interrupted run instead of starting it again."""
        if not self.exists():
            return None
        try:
            manifest = load(self.manifest_path)
        except Exception:  # noqa: BLE001 - unreadable means "not resumable"; the run starts afresh
            return None
        if manifest.get("format") != FORMAT_VERSION or config_differences(manifest["config"],
                                                                           dataclasses.asdict(config)):
            return None
        return int(manifest["completed_rounds"])

    def clear(self) -> None:
        """Forget a previous run's checkpoint (a fresh run must not inherit its LBG files)."""
        if self.directory.exists():
            log.info("starting afresh: removing the previous checkpoint in %s", self.directory)
            shutil.rmtree(self.directory)

    def save(self, state: ServerState, config: ExperimentConfig) -> int:
        """Write a checkpoint of `state`; returns the bytes of LBG files written this time."""
        self.lbg_dir.mkdir(parents=True, exist_ok=True)
        on_disk = {path.name for path in self.lbg_dir.glob("*.pt")}
        current: dict[str, tuple[int, int, int]] = {}
        written = 0
        for worker_id, entries in state.mirrors.items():
            for unit, lbg in entries.items():
                name = lbg_file_name(worker_id, unit, lbg.version)
                current[name] = (worker_id, unit, lbg.version)
                if name not in on_disk:
                    save_atomic(self.lbg_dir / name, list(lbg.tensors))
                    written += sum(t.numel() * t.element_size() for t in lbg.tensors)
        manifest = {
            "format": FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "completed_rounds": state.completed_rounds,
            "params": state.params,
            "buffers": state.buffers,
            "velocity": state.velocity,
            "workers": state.workers,
            "lbg_files": sorted(current.items()),
            "metrics": state.metrics,
            "totals": state.totals,
            "elapsed_seconds": state.elapsed_seconds,
        }
        save_atomic(self.manifest_path, manifest)
        for name in on_disk - current.keys():
            (self.lbg_dir / name).unlink(missing_ok=True)
        return written

    def load(self, config: ExperimentConfig) -> ServerState:
        """The last complete checkpoint, checked against the experiment about to resume."""
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
        mirrors: dict[int, dict[int, LookbackGradient]] = {}
        for name, (worker_id, unit, version) in manifest["lbg_files"]:
            path = self.lbg_dir / name
            try:
                tensors = load(path)
            except Exception as error:  # noqa: BLE001
                raise CheckpointError(f"checkpoint is missing or cannot read LBG file {path}: {error}") from None
            mirrors.setdefault(worker_id, {})[unit] = LookbackGradient(tuple(tensors), version)
        return ServerState(
            completed_rounds=manifest["completed_rounds"],
            params=manifest["params"],
            buffers=manifest["buffers"],
            velocity=manifest["velocity"],
            workers=[tuple(worker) for worker in manifest["workers"]],
            mirrors=mirrors,
            metrics=manifest["metrics"],
            totals=manifest["totals"],
            elapsed_seconds=manifest["elapsed_seconds"],
        )


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Experiment-defining settings that differ between a checkpoint and the config resuming it."""
    return [f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
            for key in sorted(saved.keys() | current.keys())
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]
