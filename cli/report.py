"""`lbgm report`: compare finished (or running) runs in two plots and one table.

The maths (totals, rounds to a target accuracy, savings against a measured
delta = 0 run) are pure functions over the records of metrics.jsonl; reading
folders, writing PNGs and formatting markdown are kept apart from them, so the
numbers in a report can be checked on hand-written records.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbgm.cli.options import UsageError, add_log_level
from lbgm.common.config import ConfigError, load_config
from lbgm.server.accounting import summarize

DEFAULT_TARGET_ACCURACY = 0.9
# Settings that say where files go, how often state is saved and how evaluation is
# batched: they change neither the training nor the bytes, so runs are compared across them.
BOOKKEEPING_SETTINGS = frozenset({"name", "data_dir", "checkpoint_every", "eval_batch_size"})
# Settings that do not change what a delta = 0 run sends: every layer goes in full
# whatever the granularity, and there is no scalar residual to feed back.
IGNORED_FOR_BASELINE = BOOKKEEPING_SETTINGS | {"delta", "error_feedback", "granularity"}
ESTIMATED_MARK = "†"
# A run's per-round records as the server writes them, or gzipped by --archive.
METRICS_NAMES = ("metrics.jsonl", "metrics.jsonl.gz")
# What --archive keeps of a run folder besides its records: no checkpoints, models or logs.
ARCHIVED_FILES = ("config.toml", "summary.json", "partition.txt")


@dataclass(frozen=True)
class Run:
    """One run folder as read from disk: its settings and its per-round records."""

    name: str
    path: Path
    config: dict[str, Any]
    records: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class TargetHit:
    """The first round whose test accuracy reached the target, and the uplink spent until then."""

    round: int
    uplink_bytes: int


@dataclass(frozen=True)
class Savings:
    """Uplink saved against delta = 0; `baseline` names the measured delta = 0 run,
    or is None when the run's own all-full equivalent stood in for it."""

    fraction: float
    baseline: str | None


@dataclass(frozen=True)
class Row:
    name: str
    settings: dict[str, Any]
    final_accuracy: float
    best_accuracy: float
    uplink_bytes: int
    savings: Savings
    target: TargetHit | None


# ------------------------------------------------------------------ pure maths

def cumulative_uplink(records: Iterable[dict[str, Any]]) -> list[int]:
    """Uplink bytes sent up to and including each round."""
    total, running = 0, []
    for record in records:
        total += record["uplink_bytes"]
        running.append(total)
    return running


def rounds_to_target(records: Sequence[dict[str, Any]], target: float) -> TargetHit | None:
    """The first round with test accuracy >= target (reaching it exactly counts), or None."""
    for record, spent in zip(records, cumulative_uplink(records)):
        if record["test_accuracy"] >= target:
            return TargetHit(record["round"], spent)
    return None


def savings_fraction(uplink_bytes: int, reference_bytes: int) -> float:
    """1 - sent / reference; 0 when there is nothing to compare against."""
    return 1.0 - uplink_bytes / reference_bytes if reference_bytes else 0.0


def same_but_delta(config: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two configs differ only in settings that a delta = 0 baseline may differ in."""
    keys = (config.keys() | other.keys()) - IGNORED_FOR_BASELINE
    return all(config.get(key) == other.get(key) for key in keys)


def find_baseline(run: Run, runs: Sequence[Run]) -> Run | None:
    """A measured delta = 0 run with otherwise identical settings and as many completed rounds."""
    for candidate in runs:
        if (candidate.config.get("delta") == 0 and len(candidate.records) == len(run.records)
                and same_but_delta(run.config, candidate.config)):
            return candidate
    return None


def savings(run: Run, runs: Sequence[Run]) -> Savings:
    """Savings against the measured delta = 0 twin if the set holds one, else against the
    run's own full_equivalent_uplink_bytes (the serialized size of an all-full upload)."""
    totals = summarize(run.records)
    baseline = find_baseline(run, runs)
    if baseline is None:
        return Savings(savings_fraction(totals["uplink_bytes"], totals["full_equivalent_uplink_bytes"]), None)
    reference = summarize(baseline.records)["uplink_bytes"]
    return Savings(savings_fraction(totals["uplink_bytes"], reference), baseline.name)


def differing_settings(runs: Sequence[Run]) -> list[str]:
    """delta, then every other setting whose value is not the same in all runs (config order),
    leaving out bookkeeping."""
    keys = [key for run in runs for key in run.config]
    ordered = list(dict.fromkeys(["delta", *keys]))
    return [key for key in ordered if key == "delta" or (
        key not in BOOKKEEPING_SETTINGS and len({repr(run.config.get(key)) for run in runs}) > 1)]


def build_rows(runs: Sequence[Run], target: float) -> list[Row]:
    keys = differing_settings(runs)
    rows = []
    for run in runs:
        totals = summarize(run.records)
        rows.append(Row(
            name=run.name, settings={key: run.config.get(key) for key in keys},
            final_accuracy=totals["final_accuracy"], best_accuracy=totals["best_accuracy"],
            uplink_bytes=totals["uplink_bytes"], savings=savings(run, runs),
            target=rounds_to_target(run.records, target)))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "-" if value is None else str(value)


def _savings_cell(value: Savings) -> str:
    percent = f"{100 * value.fraction:.1f}%"
    return percent if value.baseline is not None else f"{percent} {ESTIMATED_MARK}"


def format_table(rows: Sequence[Row], target: float) -> str:
    """The markdown table of a report, with footnotes for estimated savings."""
    keys = list(rows[0].settings) if rows else []
    header = ["run", *keys, "final acc", "best acc", "uplink bytes", "savings vs delta=0",
              f"rounds to {target:g}", f"uplink bytes to {target:g}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        reached = ([str(row.target.round), f"{row.target.uplink_bytes:,}"] if row.target
                   else ["not reached", "not reached"])
        cells = [row.name, *(_cell(row.settings[key]) for key in keys), f"{row.final_accuracy:.4f}",
                 f"{row.best_accuracy:.4f}", f"{row.uplink_bytes:,}", _savings_cell(row.savings), *reached]
        lines.append("| " + " | ".join(cells) + " |")
    notes = _footnotes(rows)
    return "\n".join([*lines, *([""] + notes if notes else [])]) + "\n"


def _footnotes(rows: Sequence[Row]) -> list[str]:
    notes = []
    measured = [f"{row.name} vs {row.savings.baseline}" for row in rows
                if row.savings.baseline not in (None, row.name)]
    if measured:
        notes.append("Savings compare measured uplink bytes with the delta = 0 run of otherwise identical "
                     f"settings: {'; '.join(measured)}.")
    if any(row.savings.baseline is None for row in rows):
        notes.append(f"{ESTIMATED_MARK} No delta = 0 run with otherwise identical settings and as many rounds "
                     "in this set: savings against the run's own delta = 0 equivalent (the serialized size "
                     "of an all-full upload by the same participants).")
    return notes


# ------------------------------------------------------------------ reading run folders

def metrics_file(run_dir: Path) -> Path | None:
    """The run's per-round records: metrics.jsonl as the server writes it, else an archived metrics.jsonl.gz."""
    return next((run_dir / name for name in METRICS_NAMES if (run_dir / name).is_file()), None)


def read_records(path: Path) -> tuple[dict[str, Any], ...]:
    """The rounds of a metrics.jsonl (or .gz); an empty file is an error (a run needs one round to report)."""
    try:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number} is not JSON ({error.msg}); expected one record per round") from None
    if not records:
        raise UsageError(f"{path} holds no rounds yet; a run needs at least one finished round to be reported")
    return tuple(records)


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.toml (written by `lbgm run`), else the config in summary.json (a bare `lbgm server`)."""
    if (run_dir / "config.toml").exists():
        try:
            return dataclasses.asdict(load_config(run_dir / "config.toml"))
        except ConfigError as error:
            raise UsageError(f"cannot read the settings of run {run_dir}: {error}") from None
    summary = read_summary(run_dir)
    if summary is None or "config" not in summary:
        raise UsageError(f"run {run_dir} has neither config.toml nor a summary.json with its config")
    return summary["config"]


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, or None while the run has not finished."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise UsageError(f"{run_dir / 'summary.json'} is not valid JSON: {error.msg}") from None


def load_run(run_dir: Path) -> Run:
    metrics = metrics_file(run_dir)
    if metrics is None:
        raise UsageError(f"run {run_dir} has no {' or '.join(METRICS_NAMES)}")
    return Run(run_dir.name, run_dir, read_config(run_dir), read_records(metrics))


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Each path is a run folder (it holds metrics.jsonl or .gz) or a folder of run folders."""
    found: dict[Path, Path] = {}  # resolved -> as given, so a run named twice is reported once
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"{path} is not a folder; expected a run folder or a folder of run folders")
        runs = ([path] if metrics_file(path)
                else sorted(child for child in path.iterdir() if child.is_dir() and metrics_file(child)))
        if not runs:
            raise UsageError(f"{path} holds no run: neither it nor any folder in it has a "
                             f"{' or '.join(METRICS_NAMES)}")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def load_runs(paths: Iterable[Path]) -> list[Run]:
    return [load_run(run_dir) for run_dir in find_run_dirs(paths)]


# ------------------------------------------------------------------ plots and files

def plot_accuracy(runs: Sequence[Run], x_axis: str, path: Path, title: str, target: float) -> None:
    """Test accuracy per round of every run against x_axis: 'uplink' (cumulative bytes, log) or 'rounds'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    few_points = max(len(run.records) for run in runs) <= 30
    for run in runs:
        xs = (cumulative_uplink(run.records) if x_axis == "uplink"
              else [record["round"] for record in run.records])
        axes.plot(xs, [record["test_accuracy"] for record in run.records], label=run.name,
                  marker="o" if few_points else None, markersize=3, linewidth=1.5)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    if x_axis == "uplink":
        axes.set_xscale("log")
        axes.set_xlabel("cumulative uplink (bytes, log scale)")
    else:
        axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.4)
    axes.grid(True, which="minor", alpha=0.15)
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(runs: Sequence[Run], out: Path, target: float, title: str) -> str:
    """Writes the two plots and report.md into `out`; returns the markdown table."""
    if not runs:
        raise UsageError("no runs to report")
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(runs, "uplink", out / "accuracy_vs_uplink.png", f"{title}: accuracy vs uplink", target)
    plot_accuracy(runs, "rounds", out / "accuracy_vs_rounds.png", f"{title}: accuracy vs rounds", target)
    table = format_table(build_rows(runs, target), target)
    (out / "report.md").write_text(
        f"# {title}\n\n{table}\n![accuracy vs uplink](accuracy_vs_uplink.png)\n\n"
        "![accuracy vs rounds](accuracy_vs_rounds.png)\n")
    return table


def archive_runs(runs: Sequence[Run], archive: Path) -> None:
    """Copies what a report is drawn from into archive/<run name>/: the records gzipped (under
    100 kB for 100 rounds of 100 workers) and the settings, summary and partition, so results can
    be committed and redrawn with `lbgm report <archive>`. Checkpoints, models and logs stay behind.
    Everything is checked before anything is written."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"runs to archive share a folder name: {sorted({n for n in names if names.count(n) > 1})}")
    for run in runs:
        target = archive / run.name
        if target.resolve() == run.path.resolve():
            raise UsageError(f"--archive {archive} would overwrite run {run.path} with itself")
        if target.exists() and not target.is_dir():
            raise UsageError(f"--archive: {target} exists and is not a folder")
        if (target / METRICS_NAMES[0]).exists():  # a run folder, whose plain records would also shadow ours
            raise UsageError(f"--archive: {target} holds a run's {METRICS_NAMES[0]}; archive into a folder of "
                             f"archives, not of runs")
    for run in runs:
        target = archive / run.name
        target.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in run.records)  # the records reported, as read
        (target / METRICS_NAMES[1]).write_bytes(gzip.compress(lines.encode(), mtime=0))
        for name in ARCHIVED_FILES:
            if (run.path / name).is_file():
                shutil.copyfile(run.path / name, target / name)


# ------------------------------------------------------------------ command line

def target_accuracy(text: str) -> float:
    """argparse type for --target-accuracy: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-accuracy", type=target_accuracy, default=DEFAULT_TARGET_ACCURACY,
                        help=f"accuracy whose rounds and uplink bytes to reach are reported "
                             f"(default: {DEFAULT_TARGET_ACCURACY})")


def add_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="plot and tabulate runs: accuracy against uplink bytes and rounds",
        description="Write accuracy_vs_uplink.png, accuracy_vs_rounds.png and report.md for the given runs "
                    "and print the table. Savings are measured against a delta = 0 run with otherwise "
                    "identical settings when the set holds one.")
    report.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR_OR_PARENT",
                        help="a run folder (holding metrics.jsonl, or metrics.jsonl.gz as archived) "
                             "or a folder of run folders")
    report.add_argument("--out", type=Path, required=True, help="folder to write the plots and report.md to")
    add_target_argument(report)
    report.add_argument("--title", default="LBGM runs", help="title of the plots and report (default: LBGM runs)")
    report.add_argument("--archive", type=Path, metavar="DIR",
                        help="also copy each run's records into DIR/<run>/ (metrics.jsonl gzipped, config.toml, "
                             "summary.json, partition.txt; no checkpoints): small enough to commit, and "
                             "`lbgm report DIR` redraws this report from them")
    add_log_level(report, default="WARNING")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    runs = load_runs(args.paths)
    if args.archive is not None:
        archive_runs(runs, args.archive)
    table = write_report(runs, args.out, args.target_accuracy, args.title)
    print(table, end="")
    print(f"\nwrote {args.out / 'report.md'}, accuracy_vs_uplink.png and accuracy_vs_rounds.png")
    if args.archive is not None:
        print(f"archived the records of {len(runs)} runs in {args.archive}")
    return 0
