"""`lbgm analyze-gradients`: the paper's gradient-space analysis (N95/N99 per layer).

Trains a model centrally, then writes OUT/gradient_space.json (every count),
OUT/gradient_space.md (the final-epoch table, also printed) and
OUT/gradient_space.png (N95 and N99 against epoch, one panel per layer).
The analysis itself lives in lbgm.sim.gradient_space; this module only turns
options into settings and the report into files.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import matplotlib
from matplotlib.ticker import MaxNLocator

from lbgm.cli.options import UsageError, add_log_level
from lbgm.tasks.datasets import DATASETS, EMBEDDED, INFO
from lbgm.tasks.models import MODELS
from lbgm.sim.gradient_space import FRACTIONS, AnalysisSettings, GradientSpaceReport, run_analysis

COMMAND = "analyze-gradients"
OUTPUT_FILES = ("gradient_space.json", "gradient_space.md", "gradient_space.png")
MEANING = ("N95 / N99: the fewest principal components (uncentered, per layer) of the per-epoch accumulated "
           "gradients of all epochs so far that explain 95% / 99% of their variance; at most the number of "
           "epochs. Small values mean new gradients stay in the span of old ones, which LBGM exploits.")


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


def report_json(report: GradientSpaceReport) -> dict:
    settings = report.settings
    return {
        "settings": {"dataset": settings.dataset, "model": settings.model, "epochs": settings.epochs,
                     "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed,
                     "max_samples": settings.max_samples},
        "train_samples": report.train_samples,
        "centered": False,
        "fractions": list(FRACTIONS),
        "epoch_losses": list(report.epoch_losses),
        "test_accuracy": report.test_accuracy,
        "layers": [{"name": layer.name, "values": layer.num_values, "n95": list(layer.n95), "n99": list(layer.n99)}
                   for layer in report.layers],
    }


def markdown_table(report: GradientSpaceReport) -> str:
    """The final-epoch counts, one row per parameter tensor, and what they mean."""
    settings = report.settings
    epochs = settings.epochs
    lines = [
        f"Gradient space of {settings.model} on {settings.dataset} ({report.train_samples} training samples, "
        f"batch {settings.batch_size}, lr {settings.lr}, seed {settings.seed}; "
        f"test accuracy after epoch {epochs}: {report.test_accuracy:.4f})",
        "",
        "| layer | values | N95 | N99 | epochs |",
        "|---|---:|---:|---:|---:|",
        *(f"| {layer.name} | {layer.num_values:,} | {layer.n95[-1]} | {layer.n99[-1]} | {epochs} |"
          for layer in report.layers),
        "",
        MEANING,
    ]
    return "\n".join(lines) + "\n"


def plot_report(report: GradientSpaceReport, path: Path) -> None:
    """N95 and N99 against epoch, one panel per layer, with the e-components ceiling."""
    matplotlib.use("Agg")  # files only: no display on servers and in tests; must precede pyplot
    from matplotlib import pyplot as plt

    layers = report.layers
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), squeeze=False, sharex=True)
    epochs = list(range(1, report.settings.epochs + 1))
    for axis, layer in zip(axes.flat, layers):
        axis.plot(epochs, epochs, color="0.75", linestyle=":", label="epochs (ceiling)")
        axis.plot(epochs, layer.n99, marker="s", markersize=3, label="N99")
        axis.plot(epochs, layer.n95, marker="o", markersize=3, label="N95")
        axis.set_title(f"{layer.name} ({layer.num_values:,} values)", fontsize=9)
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(layers):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("epoch")
    for axis in axes[:, 0]:
        axis.set_ylabel("components")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", ncol=3, fontsize=9)
    settings = report.settings
    figure.suptitle(f"Principal components of per-epoch gradients: {settings.model} on {settings.dataset}",
                    x=0.02, ha="left", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(report: GradientSpaceReport, out: Path) -> str:
    """Write the three files to `out` (created); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, plot_path = (out / name for name in OUTPUT_FILES)
    json_path.write_text(json.dumps(report_json(report), indent=2) + "\n")
    markdown = markdown_table(report)
    markdown_path.write_text(markdown)
    plot_report(report, plot_path)
    return markdown


def cmd_analyze_gradients(args: argparse.Namespace) -> int:
    import torch

    settings = settings_from_args(args)
    torch.set_num_threads(args.torch_threads)
    report = run_analysis(settings)
    print(write_outputs(report, args.out), end="")
    print(f"wrote {', '.join(str(args.out / name) for name in OUTPUT_FILES)}")
    return 0
