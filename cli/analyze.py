"""`lbgm analyze-gradients`: the paper's gradient-space analysis (N95/N99 per layer).

Trains a model centrally (or, with --federated, runs a federation in-process),
then writes OUT/gradient_space.json (every count), OUT/gradient_space.md (the
final table, also printed) and OUT/gradient_space.png (N95 and N99 against
epoch or round, one panel per layer, with the ceiling N = epochs).
The analysis itself lives in lbgm.sim.gradient_space and its files in
lbgm.report.gradient_space; this module only turns options into settings.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path

from lbgm.cli.options import UsageError, add_log_level
from lbgm.experiment.config import load_config
from lbgm.report.gradient_space import OUTPUT_FILES, load_report, write_outputs
from lbgm.sim.gradient_space import (
    AnalysisSettings, FederatedSettings, Treatment, run_analysis, run_federated_analysis,
)
from lbgm.tasks.datasets import DATASETS, EMBEDDED, INFO
from lbgm.tasks.models import MODELS

COMMAND = "analyze-gradients"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `analyze-gradients` subcommand to the `lbgm` command line."""

    parser = commands.add_parser(
        COMMAND, help="count the principal components of per-epoch gradients (the paper's N95/N99 analysis)",
        description="Train a model centrally with minibatch SGD, keep each epoch's accumulated gradient per "
                    "layer, and count how many principal components explain 95% and 99% of their variance "
                    "after every epoch. With --federated, run the federation of --config in this process and "
                    "count, per round, the components of tracked workers' true gradients, of their aggregate "
                    "and of the global update. Writes gradient_space.json, .md and .png to --out.")
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
    parser.add_argument("--weight-decay", type=float, default=0.0, metavar="WD",
                        help="L2 weight decay of the central training; its gradient is part of the recorded one, as "
                             "in the reference's torch 1.4 SGD (the reference: 5e-4; default: 0)")
    parser.add_argument("--momentum", type=float, default=0.0, metavar="M",
                        help="analyse the momentum sums v_e = M v_(e-1) + g_e instead of the gradients g_e, as the "
                             "reference's process_grads.py does with M = 0.9 (default: 0, the raw gradients)")
    parser.add_argument("--centered", action="store_true",
                        help="subtract each gradient's mean over its own entries before counting, as the "
                             "reference's sklearn PCA does (default: uncentered, the span LBGM uses)")
    parser.add_argument("--unit-rows", action="store_true",
                        help="scale every (treated) gradient to length 1 before counting, so that late, small "
                             "gradients weigh like early ones (LBGM's phase error ignores length; default: off)")
    parser.add_argument("--recount", type=Path, metavar="DIR",
                        help="train nothing: count again the gradients of an earlier run's --out folder (its json and "
                             "grams files) with this --momentum, --centered and --unit-rows")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads for training (default: 1)")
    federated = parser.add_argument_group(
        "federated mode (--dataset, --model, --epochs, --batch-size, --lr, --seed, --max-samples and "
        "--weight-decay are central-only: the config gives the federation's)")
    federated.add_argument("--federated", action="store_true",
                           help="analyse the gradients within a federated run of --config instead of central training")
    federated.add_argument("--config", type=Path, metavar="TOML", help="the federation's experiment settings")
    federated.add_argument("--rounds", type=int, metavar="N", help="rounds to run (default: the config's)")
    federated.add_argument("--delta", type=float, default=0.0,
                           help="LBGM threshold of the run (default: 0, FedAvg, so that LBGM does not shape the "
                                "gradients it is judged on)")
    federated.add_argument("--track-workers", type=int, default=10, metavar="K",
                           help="workers 1..K keep their own gradient series (default: 10)")
    add_log_level(parser)
    parser.set_defaults(func=cmd_analyze_gradients)


def usage_problems(args: argparse.Namespace) -> Iterator[str]:
    """Every user mistake in `args`, as a message naming the wrong value."""
    if not (math.isfinite(args.momentum) and 0.0 <= args.momentum <= 1.0):
        yield f"--momentum must lie in [0, 1], got {args.momentum}"
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0.0):
        yield f"--weight-decay must be a number >= 0, got {args.weight_decay}"
    if args.recount is not None and not args.recount.is_dir():
        yield f"--recount {args.recount} is not a folder"
    if args.federated:
        yield from federated_problems(args)
    elif args.config is not None or args.rounds is not None:
        yield "--config and --rounds need --federated (central training takes --epochs)"
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


def federated_problems(args: argparse.Namespace) -> Iterator[str]:
    if args.config is None:
        yield "--federated needs --config (the federation's TOML settings)"
    elif not args.config.is_file():
        yield f"--config {args.config} is not a file"
    if args.rounds is not None and args.rounds < 2:
        yield f"--rounds must be >= 2 (N95/N99 compare rounds), got {args.rounds}"
    if not (math.isfinite(args.delta) and 0.0 <= args.delta <= 1.0):
        yield f"--delta must lie in [0, 1], got {args.delta}"
    if args.track_workers < 1:
        yield f"--track-workers must be >= 1, got {args.track_workers}"


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings | FederatedSettings:
    """Checked settings; the first user mistake is raised as a UsageError (a bad config file as a ConfigError)."""

    problem = next(usage_problems(args), None)
    if problem is not None:
        raise UsageError(problem)
    treatment = Treatment(momentum=args.momentum, centered=args.centered, unit_rows=args.unit_rows)
    if args.federated:
        overrides = {"delta": args.delta, **({"rounds": args.rounds} if args.rounds is not None else {}),
                     **({"data_dir": str(args.data_dir)} if args.data_dir is not None else {})}
        config = load_config(args.config, overrides)
        if config.rounds < 2:
            raise UsageError(f"the federation needs >= 2 rounds (N95/N99 compare rounds), got {config.rounds}")
        if args.track_workers > config.workers:
            raise UsageError(f"--track-workers must be <= the config's {config.workers} workers, "
                             f"got {args.track_workers}")
        return FederatedSettings(config=config, track_workers=args.track_workers, treatment=treatment)
    return AnalysisSettings(dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, max_samples=args.max_samples, data_dir=args.data_dir,
                            weight_decay=args.weight_decay, treatment=treatment)


def cmd_analyze_gradients(args: argparse.Namespace) -> int:
    import torch

    settings = settings_from_args(args)
    torch.set_num_threads(args.torch_threads)
    if args.recount is not None:
        report = load_report(args.recount, settings.treatment)
    elif isinstance(settings, FederatedSettings):
        report = run_federated_analysis(settings)
    else:
        report = run_analysis(settings)
    print(write_outputs(report, args.out), end="")
    print(f"wrote {', '.join(str(args.out / name) for name in OUTPUT_FILES)}")
    return 0
