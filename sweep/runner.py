"""Running a sweep: every grid point as a real federation (`run_federation`: a server and
worker processes over localhost gRPC) in a folder named after the point, one after another;
a point whose folder holds a finished run of the same settings is skipped, and an interrupted
one continues from its last checkpoint."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbgm.experiment.config import ExperimentConfig
from lbgm.report.runs import read_summary

FINISHED = ("done", "skipped")  # outcomes whose run folder holds a complete run


@dataclass(frozen=True)
class Outcome:
    """What happened to one grid point: 'done', 'skipped' or 'failed', and a one-line detail."""

    name: str
    status: str
    detail: str


def is_complete(summary: dict[str, Any] | None, config: ExperimentConfig) -> bool:
    """A finished run of exactly these settings: what a resumed sweep may skip."""
    return (summary is not None and summary.get("rounds_completed") == config.rounds
            and summary.get("config") == dataclasses.asdict(config))


def run_point(config: ExperimentConfig, out_dir: Path, processes: int, log_level: str,
              log_format: str) -> Outcome:
    """One grid point as a real `lbgm run`; a failure is an outcome, not an exception, so the others run."""
    from lbgm.launch.federation import run_federation
    from lbgm.server.checkpoint import CheckpointStore

    run_dir = out_dir / config.name
    summary = read_summary(run_dir)
    if is_complete(summary, config):
        return Outcome(config.name, "skipped", f"already complete in {run_dir}")
    resumable_round = CheckpointStore.of_run(run_dir).resumable_round(config)
    if resumable_round is not None:
        print(f"lbgm sweep: resuming {config.name} from its checkpoint after round {resumable_round}",
              file=sys.stderr)
    elif summary is not None:
        print(f"lbgm sweep: {run_dir} holds a run of other settings; running it again", file=sys.stderr)
    started = time.monotonic()
    try:
        status = run_federation(config, out_dir, processes, log_level, log_format,
                                resume=resumable_round is not None)
    except (RuntimeError, OSError) as error:
        first_line = f"{type(error).__name__}: {error}".splitlines()[0].rstrip(":")
        return Outcome(config.name, "failed", f"{first_line}; logs in {run_dir / 'logs'}")
    if status != 0:
        return Outcome(config.name, "interrupted" if status == 130 else "failed",
                       f"exit status {status}; logs in {run_dir / 'logs'}")
    summary = read_summary(run_dir) or {}
    return Outcome(config.name, "done",
                   f"{time.monotonic() - started:.1f} s, final accuracy {summary.get('final_accuracy', 0):.4f}, "
                   f"uplink {summary.get('uplink_bytes', 0):,} bytes")


def run_sweep(configs: Sequence[ExperimentConfig], out_dir: Path, processes: int,
              log_level: str, log_format: str) -> list[Outcome]:
    """Runs the grid in order, printing one line per point; stops early only when interrupted."""
    outcomes = []
    for index, config in enumerate(configs, start=1):
        outcome = run_point(config, out_dir, processes, log_level, log_format)
        print(f"sweep [{index}/{len(configs)}] {outcome.name}: {outcome.status} ({outcome.detail})", flush=True)
        outcomes.append(outcome)
        if outcome.status == "interrupted":
            break
    return outcomes


def sweep_exit_status(outcomes: Sequence[Outcome]) -> int:
    statuses = {outcome.status for outcome in outcomes}
    return 130 if "interrupted" in statuses else 1 if "failed" in statuses else 0
