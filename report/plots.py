"""The plots of a report (test accuracy against uplink bytes and against rounds) and the
report.md that shows them under the comparison table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lbgm.report.comparison import build_rows, cumulative_uplink, format_table
from lbgm.report.runs import ReportError, Run


def plotted_metric(runs: Sequence[Run]) -> str:
    """test_accuracy, or test_loss for runs whose task measures no accuracy (e.g. a regression)."""
    has_accuracy = any(math.isfinite(record["test_accuracy"]) for run in runs for record in run.records)
    return "test_accuracy" if has_accuracy else "test_loss"


def plot_accuracy(runs: Sequence[Run], x_axis: str, path: Path, title: str, target: float) -> None:
    """Test accuracy (test loss if the runs have no accuracy) per round of every run against x_axis:
    'uplink' (cumulative bytes, log) or 'rounds'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = plotted_metric(runs)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    few_points = max(len(run.records) for run in runs) <= 30
    for run in runs:
        xs = (cumulative_uplink(run.records) if x_axis == "uplink"
              else [record["round"] for record in run.records])
        axes.plot(xs, [record[metric] for record in run.records], label=run.name,
                  marker="o" if few_points else None, markersize=3, linewidth=1.5)
    if metric == "test_accuracy":
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    if x_axis == "uplink":
        axes.set_xscale("log")
        axes.set_xlabel("cumulative uplink (bytes, log scale)")
    else:
        axes.set_xlabel("round")
    axes.set_ylabel(metric.replace("_", " "))
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
        raise ReportError("no runs to report")
    out.mkdir(parents=True, exist_ok=True)
    shown = plotted_metric(runs).replace("test_", "")
    plot_accuracy(runs, "uplink", out / "accuracy_vs_uplink.png", f"{title}: {shown} vs uplink", target)
    plot_accuracy(runs, "rounds", out / "accuracy_vs_rounds.png", f"{title}: {shown} vs rounds", target)
    table = format_table(build_rows(runs, target), target)
    (out / "report.md").write_text(
        f"# {title}\n\n{table}\n![accuracy vs uplink](accuracy_vs_uplink.png)\n\n"
        "![accuracy vs rounds](accuracy_vs_rounds.png)\n")
    return table
