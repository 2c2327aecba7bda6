"""`lbgm sweep`: a grid of `lbgm run`s, one after another, that can be resumed.

The axes come from a [sweep] table in the base TOML file (each key a list of
values) and from repeated --grid KEY=V1,V2 options, which replace a file axis
of the same key. Every grid point is a real federation (`run_federation`: a
server and worker processes over localhost gRPC) in a folder named after the
point, so starting the same sweep again skips the points whose folder already
holds a finished run of the same settings and continues an interrupted one from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbgm.cli.options import FALSE_WORDS, TRUE_WORDS, UsageError, add_log_level
from lbgm.cli.report import add_target_argument, build_rows, format_table, load_run, read_summary
from lbgm.common.config import FIELDS, ConfigError, ExperimentConfig, add_config_arguments, config_from_args
from lbgm.task.loader import check_task

FINISHED = ("done", "skipped")  # outcomes whose run folder holds a complete run


@dataclass(frozen=True)
class Outcome:
    """What happened to one grid point: 'done', 'skipped' or 'failed', and a one-line detail."""

    name: str
    status: str
    detail: str


# ------------------------------------------------------------------ the grid

def check_key(key: str, source: str) -> None:
    if key == "name":
        raise UsageError(f"{source}: 'name' cannot be swept; each run is named after its grid point")
    if key not in FIELDS:
        raise UsageError(f"{source}: unknown setting {key!r}; known settings: {', '.join(FIELDS)}")


def parse_value(key: str, text: str) -> Any:
    """One --grid value, read as the type of the ExperimentConfig field `key`."""
    kind = type(FIELDS[key].default)
    word = text.strip()
    if kind is bool:
        if word.lower() in TRUE_WORDS + FALSE_WORDS:
            return word.lower() in TRUE_WORDS
        raise UsageError(f"--grid {key}: expected true or false, got {text!r}")
    try:
        return kind(word)
    except ValueError:
        raise UsageError(f"--grid {key}: expected a {kind.__name__}, got {text!r}") from None


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """'delta=0,0.2' -> ('delta', [0.0, 0.2]); flag spelling (local-lr) is accepted for keys."""
    key, equals, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not equals or not key or not values.strip():
        raise UsageError(f"--grid expects KEY=V1,V2,..., got {text!r}")
    check_key(key, "--grid")
    return key, [parse_value(key, value) for value in values.split(",")]


def grid_from_options(options: Sequence[str]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for option in options:
        key, values = parse_grid_option(option)
        if key in axes:
            raise UsageError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2")
        axes[key] = values
    return axes


def read_sweep_table(path: Path) -> dict[str, list[Any]]:
    """The [sweep] table of a base config file (empty when it has none)."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    table = document.get("sweep", {})
    source = f"[sweep] in {path}"
    if "sweep" in document and "experiment" not in document:
        raise UsageError(f"{path}: a file with a [sweep] table keeps its base settings under [experiment]")
    if not isinstance(table, dict):
        raise UsageError(f"{source} must be a table of setting = [values], got {table!r}")
    for key, values in table.items():
        check_key(key, source)
        if not isinstance(values, list) or not values:
            raise UsageError(f"{source}: {key} must be a non-empty list (e.g. delta = [0.0, 0.2]), got {values!r}")
    return table


def expand_grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def format_value(value: Any) -> str:
    """A value as it appears in a run name: stable and safe in a file name (0.0 -> '0', 0.5 -> '0.5')."""
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value).removesuffix(".0") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def run_name(base: str, point: dict[str, Any]) -> str:
    return "-".join([base, *(f"{key}{format_value(value)}" for key, value in point.items())])


def grid_configs(base: ExperimentConfig, axes: dict[str, list[Any]]) -> list[ExperimentConfig]:
    """One validated config per grid point, all checked before any run starts."""
    configs = []
    for point in expand_grid(axes):
        try:
            config = base.with_overrides(point)
        except ConfigError as error:
            label = ", ".join(f"{key}={value!r}" for key, value in point.items())
            raise UsageError(f"grid point {label}: {error}") from None
        typed = {key: getattr(config, key) for key in point}  # 1 and 1.0 name the same run
        configs.append(dataclasses.replace(config, name=run_name(base.name, typed)))
    names = [config.name for config in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"the grid names runs more than once ({', '.join(repeated)}); give each value once")
    return configs


def is_complete(summary: dict[str, Any] | None, config: ExperimentConfig) -> bool:
    """A finished run of exactly these settings: what a resumed sweep may skip."""
    return (summary is not None and summary.get("rounds_completed") == config.rounds
            and summary.get("config") == dataclasses.asdict(config))


def check_processes(processes: int, configs: Sequence[ExperimentConfig]) -> None:
    """--processes must suit every run, so a bad value stops the sweep before the first run."""
    for config in configs:
        if processes and not 1 <= processes <= config.workers:
            raise UsageError(f"--processes must lie in [1, workers={config.workers}] for run {config.name}, "
                             f"got {processes}")


# ------------------------------------------------------------------ running

def run_point(config: ExperimentConfig, out_dir: Path, processes: int, log_level: str,
              log_format: str) -> Outcome:
    """One grid point as a real `lbgm run`; a failure is an outcome, not an exception, so the others run."""
    from lbgm.cli.launcher import run_federation
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


# ------------------------------------------------------------------ command line

def add_parser(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep", help="run a grid of experiments (each a real `lbgm run`) and tabulate them",
        description="Run every combination of the --grid values and of the [sweep] table of --config "
                    "(e.g. delta = [0.0, 0.2], seed = [0, 1]), one `lbgm run` after another, in folders "
                    "named <name>-<key><value>-...; finished runs of the same settings are skipped and a run "
                    "interrupted after a checkpoint continues from it, so an interrupted sweep is resumed "
                    "by starting it again.")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a setting and its values (repeatable); replaces the [sweep] entry of the same key "
                            "and any --KEY flag")
    sweep.add_argument("--out-dir", type=Path,
                       help="parent folder of the sweep's run folders (default: runs/sweeps/<name>)")
    sweep.add_argument("--processes", type=int, default=0,
                       help="worker OS processes per run (default: one per worker, at most 10)")
    add_target_argument(sweep)
    add_log_level(sweep)  # also passed to every run's server and worker processes
    add_config_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    file_axes = read_sweep_table(args.config) if args.config else {}
    axes = {**file_axes, **grid_from_options(args.grid)}
    if not axes:
        raise UsageError("nothing to sweep: give --grid KEY=V1,V2,... or a [sweep] table in the --config file")
    base = config_from_args(args)
    configs = grid_configs(base, axes)
    check_processes(args.processes, configs)
    for task, options, seed in dict.fromkeys((c.task, c.task_options, c.seed) for c in configs):
        check_task(task, options, seed)  # every task of the grid loads, before any run starts
    out_dir = args.out_dir or Path("runs") / "sweeps" / base.name
    print(f"lbgm sweep: {len(configs)} runs in {out_dir}", flush=True)
    outcomes = run_sweep(configs, out_dir, args.processes, args.log_level, args.log_format)
    finished = [load_run(out_dir / outcome.name) for outcome in outcomes if outcome.status in FINISHED]
    if finished:
        print()
        print(format_table(build_rows(finished, args.target_accuracy), args.target_accuracy), end="")
    failed = [outcome.name for outcome in outcomes if outcome.status not in FINISHED]
    if failed:
        print(f"\nlbgm sweep: {len(failed)} of {len(configs)} runs did not finish: {', '.join(failed)}",
              file=sys.stderr)
    return sweep_exit_status(outcomes)
