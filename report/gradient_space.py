"""The files of the gradient-space analysis (`lbgm analyze-gradients`): gradient_space.json
(every count), gradient_space.md (the final-epoch table) and gradient_space.png (N95 and N99
against epoch, one panel per layer). The analysis itself is lbgm.sim.gradient_space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
from matplotlib.ticker import MaxNLocator

from lbgm.sim.gradient_space import FRACTIONS, GradientSpaceReport

OUTPUT_FILES = ("gradient_space.json", "gradient_space.md", "gradient_space.png")
MEANING = ("N95 / N99: the fewest principal components (uncentered, per layer) of the per-epoch accumulated "
           "gradients of all epochs so far that explain 95% / 99% of their variance; at most the number of "
           "epochs. Small values mean new gradients stay in the span of old ones, which LBGM exploits.")


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
