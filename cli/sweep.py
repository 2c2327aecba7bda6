"""`lbgm sweep`: a grid of `lbgm run`s, one after another, that can be resumed.

The axes come from a [sweep] table in the base TOML file (each key a list of
values) and from repeated --grid KEY=V1,V2 options, which replace a file axis
of the same key. This module holds the flags, their checks and the call; the
grid and the running are lbgm.sweep (sweep/), the table lbgm.report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbgm.cli.options import FALSE_WORDS, TRUE_WORDS, UsageError, add_log_level
from lbgm.cli.report import add_target_argument
from lbgm.experiment.config import FIELDS, ExperimentConfig, add_config_arguments, config_from_args
from lbgm.report.comparison import build_rows, format_table
from lbgm.report.runs import load_run
from lbgm.sweep.grid import axis_problem, grid_configs, read_sweep_table
from lbgm.sweep.runner import FINISHED, run_sweep, sweep_exit_status
from lbgm.task.loader import check_task


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
    if (problem := axis_problem(key)) is not None:
        raise UsageError(f"--grid: {problem}")
    return key, [parse_value(key, value) for value in values.split(",")]


def grid_from_options(options: Sequence[str]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for option in options:
        key, values = parse_grid_option(option)
        if key in axes:
            raise UsageError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2")
        axes[key] = values
    return axes


def check_processes(processes: int, configs: Sequence[ExperimentConfig]) -> None:
    """--processes must suit every run, so a bad value stops the sweep before the first run."""
    for config in configs:
        if processes and not 1 <= processes <= config.workers:
            raise UsageError(f"--processes must lie in [1, workers={config.workers}] for run {config.name}, "
                             f"got {processes}")


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
                       help="worker OS processes per run (default: one per core but one, at least one, at most one per worker)")
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
