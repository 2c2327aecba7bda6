"""`lbgm report`: compare finished (or running) runs in two plots and one table.

The flags, their checks and the call; reading run folders, the comparison and the
plots are lbgm.report (report/).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lbgm.cli.options import add_log_level
from lbgm.report.plots import PLOTS, write_report
from lbgm.report.published import read_published
from lbgm.report.runs import archive_runs, load_runs

DEFAULT_TARGET_ACCURACY = 0.9


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
                        help=f"accuracy whose rounds, uplink bytes and total bytes to reach are reported "
                             f"(default: {DEFAULT_TARGET_ACCURACY})")


def add_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="plot and tabulate runs: accuracy against uplink bytes, all bytes and rounds",
        description=f"Write {', '.join(name for name, _ in PLOTS.values())} and report.md for the given runs "
                    "and print the tables: bytes up, down and in total with their savings, and the downlink "
                    "by message kind. Savings are measured against a delta = 0 run with otherwise "
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
    report.add_argument("--published", type=Path, metavar="CSV",
                        help="accuracy figures published elsewhere (e.g. the authors' code), a CSV file with the "
                             "header series,round,accuracy: drawn as markers on accuracy_vs_rounds.png and tabled "
                             "beside each run's accuracy at the same round")
    add_log_level(report, default="WARNING")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    runs = load_runs(args.paths)
    published = read_published(args.published) if args.published is not None else ()
    if args.archive is not None:
        archive_runs(runs, args.archive)
    table = write_report(runs, args.out, args.target_accuracy, args.title, published)
    print(table, end="")
    print(f"\nwrote {args.out / 'report.md'}, {', '.join(name for name, _ in PLOTS.values())}")
    if args.archive is not None:
        print(f"archived the records of {len(runs)} runs in {args.archive}")
    return 0
