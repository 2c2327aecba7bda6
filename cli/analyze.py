"""`lbgm analyze-gradients`: the paper's gradient-space analysis (N95/N99 per layer).

Trains a model centrally, then writes OUT/gradient_space.json (every count),
OUT/gradient_space.md (the final-epoch table, also printed) and
OUT/gradient_space.png (N95 and N99 against epoch, one panel per layer).
The analysis itself lives in lbgm.sim.gradient_space and its files in
lbgm.report.gradient_space; this module only turns options into settings.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path

from lbgm.cli.options import UsageError, add_log_level
from lbgm.report.gradient_space import OUTPUT_FILES, write_outputs
from lbgm.sim.gradient_space import AnalysisSettings, run_analysis
from lbgm.tasks.datasets import DATASETS, EMBEDDED, INFO
from lbgm.tasks.models import MODELS

COMMAND = "analyze-gradients"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `analyze-gradients` subcommand to the `lbgm` command line."""

    parser = commands.add_parser(
        COMMAND, help="count the principal components of per-epoch gradients (the paper's N95/N99 analysis)",
        description="Train a model centrally with minibatch SGD, keep each epoch's accumulated gradient per "
                    "layer, and count how many principal components explain 95% and 99% of their variance "
                    "after every epoch. Writes gradient_space.json, .md and .png to --out.")
    parser.add_argument("--dataset", default="mnist-embedded",
                        help=f"training data, one of {', '.join(DATASETS)} (default: mnist-embedded)")
    parser.add_argument("--model", default="cnn", help=f"model, one of {', '.join(sorted(MODELS))} (default: cnn)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs to train and analyse, >= 2 (default: 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="SGD minibatch size (default: 64)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for the three output files (created)")
    folders = ", ".join(f"{info.folder}/" for name, info in INFO.items() if name != EMBEDDED)
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help=f"folder holding the data set's files ({folders}); not needed for mnist-embedded")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order (default: 0)")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        help="train on the first N training samples only, for quick runs (default: all)")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads for training (default: 1)")
    add_log_level(parser)
    parser.set_defaults(func=cmd_analyze_gradients)


def usage_problems(args: argparse.Namespace) -> Iterator[str]:
    """Every user mistake in `args`, as a message naming the wrong value."""
    if args.epochs < 2:
        yield f"--epochs must be >= 2 (N95/N99 compare epochs), got {args.epochs}"
    if args.batch_size < 1:
        yield f"--batch-size must be >= 1, got {args.batch_size}"
    if not (math.isfinite(args.lr) and args.lr > 0):
        yield f"--lr must be a positive number, got {args.lr}"
    if args.max_samples is not None and args.max_samples < 1:
        yield f"--max-samples must be >= 1, got {args.max_samples}"
    if args.torch_threads < 1:
        yield f"--torch-threads must be >= 1, got {args.torch_threads}"
    if args.model not in MODELS:
        yield f"--model must be one of {sorted(MODELS)}, got {args.model!r}"
    if args.dataset not in DATASETS:
        yield f"--dataset must be one of {list(DATASETS)}, got {args.dataset!r}"
    if args.data_dir is not None and not args.data_dir.is_dir():
        yield f"--data-dir {args.data_dir} is not a folder"
    if args.dataset in DATASETS and args.dataset != EMBEDDED and args.data_dir is None:
        yield f"--dataset {args.dataset} needs --data-dir (a folder holding {INFO[args.dataset].folder}/)"
    if args.out.exists() and not args.out.is_dir():
        yield f"--out {args.out} exists and is not a folder"


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    """Checked settings; the first user mistake is raised as a UsageError."""

    problem = next(usage_problems(args), None)
    if problem is not None:
        raise UsageError(problem)
    return AnalysisSettings(dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, max_samples=args.max_samples, data_dir=args.data_dir)


def cmd_analyze_gradients(args: argparse.Namespace) -> int:
    import torch

    settings = settings_from_args(args)
    torch.set_num_threads(args.torch_threads)
    report = run_analysis(settings)
    print(write_outputs(report, args.out), end="")
    print(f"wrote {', '.join(str(args.out / name) for name in OUTPUT_FILES)}")
    return 0
