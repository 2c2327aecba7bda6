"""Run folders as `lbgm report` and `lbgm sweep` read them: the settings (config.toml, or the
summary of a bare `lbgm server`) and the per-round records (metrics.jsonl, or metrics.jsonl.gz
as archived), and the archive that keeps only what a report is drawn from."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbgm.experiment.config import ConfigError, load_config

# A run's per-round records as the server writes them, or gzipped by --archive.
METRICS_NAMES = ("metrics.jsonl", "metrics.jsonl.gz")
# What --archive keeps of a run folder besides its records: no checkpoints, models or logs.
ARCHIVED_FILES = ("config.toml", "summary.json", "partition.txt")


class ReportError(ValueError):
    """A run folder that cannot be read or archived as asked: one line naming it, nothing written."""


@dataclass(frozen=True)
class Run:
    """One run folder as read from disk: its settings and its per-round records."""

    name: str
    path: Path
    config: dict[str, Any]
    records: tuple[dict[str, Any], ...]


def metrics_file(run_dir: Path) -> Path | None:
    """The run's per-round records: metrics.jsonl as the server writes it, else an archived metrics.jsonl.gz."""
    return next((run_dir / name for name in METRICS_NAMES if (run_dir / name).is_file()), None)


def read_records(path: Path) -> tuple[dict[str, Any], ...]:
    """The rounds of a metrics.jsonl (or .gz); an empty file is an error (a run needs one round to report)."""
    try:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ReportError(f"{path} line {number} is not JSON ({error.msg}); expected one record per round") from None
    if not records:
        raise ReportError(f"{path} holds no rounds yet; a run needs at least one finished round to be reported")
    return tuple(records)


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.toml (written by `lbgm run`), else the config in summary.json (a bare `lbgm server`)."""
    if (run_dir / "config.toml").exists():
        try:
            return dataclasses.asdict(load_config(run_dir / "config.toml"))
        except ConfigError as error:
            raise ReportError(f"cannot read the settings of run {run_dir}: {error}") from None
    summary = read_summary(run_dir)
    if summary is None or "config" not in summary:
        raise ReportError(f"run {run_dir} has neither config.toml nor a summary.json with its config")
    return summary["config"]


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, or None while the run has not finished."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise ReportError(f"{run_dir / 'summary.json'} is not valid JSON: {error.msg}") from None


def load_run(run_dir: Path) -> Run:
    metrics = metrics_file(run_dir)
    if metrics is None:
        raise ReportError(f"run {run_dir} has no {' or '.join(METRICS_NAMES)}")
    return Run(run_dir.name, run_dir, read_config(run_dir), read_records(metrics))


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Each path is a run folder (it holds metrics.jsonl or .gz) or a folder of run folders."""
    found: dict[Path, Path] = {}  # resolved -> as given, so a run named twice is reported once
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder; expected a run folder or a folder of run folders")
        runs = ([path] if metrics_file(path)
                else sorted(child for child in path.iterdir() if child.is_dir() and metrics_file(child)))
        if not runs:
            raise ReportError(f"{path} holds no run: neither it nor any folder in it has a "
                             f"{' or '.join(METRICS_NAMES)}")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def load_runs(paths: Iterable[Path]) -> list[Run]:
    return [load_run(run_dir) for run_dir in find_run_dirs(paths)]


def archive_runs(runs: Sequence[Run], archive: Path) -> None:
    """Copies what a report is drawn from into archive/<run name>/: the records gzipped (under
    100 kB for 100 rounds of 100 workers) and the settings, summary and partition, so results can
    be committed and redrawn with `lbgm report <archive>`. Checkpoints, models and logs stay behind.
    Everything is checked before anything is written."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"runs to archive share a folder name: {sorted({n for n in names if names.count(n) > 1})}")
    for run in runs:
        target = archive / run.name
        if target.resolve() == run.path.resolve():
            raise ReportError(f"--archive {archive} would overwrite run {run.path} with itself")
        if target.exists() and not target.is_dir():
            raise ReportError(f"--archive: {target} exists and is not a folder")
        if (target / METRICS_NAMES[0]).exists():  # a run folder, whose plain records would also shadow ours
            raise ReportError(f"--archive: {target} holds a run's {METRICS_NAMES[0]}; archive into a folder of "
                             f"archives, not of runs")
    for run in runs:
        target = archive / run.name
        target.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in run.records)  # the records reported, as read
        (target / METRICS_NAMES[1]).write_bytes(gzip.compress(lines.encode(), mtime=0))
        for name in ARCHIVED_FILES:
            if (run.path / name).is_file():
                shutil.copyfile(run.path / name, target / name)
