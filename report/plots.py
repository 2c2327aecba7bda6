"""The plots of a report (test accuracy against uplink bytes, against uplink and downlink bytes
together, and against rounds) and the report.md that shows them under the comparison tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lbgm.report.comparison import build_rows, cumulative_bytes, format_table
from lbgm.report.published import PublishedPoint, published_table
from lbgm.report.runs import ReportError, Run

# x axis of plot_accuracy -> (file name, label in titles and report.md); a byte axis is cumulative and logarithmic
PLOTS = {
    "uplink": ("accuracy_vs_uplink.png", "uplink"),
    "total": ("accuracy_vs_total_bytes.png", "uplink + downlink"),
    "rounds": ("accuracy_vs_rounds.png", "rounds"),
}


def plotted_metric(runs: Sequence[Run]) -> str:
    """test_accuracy, or test_loss for runs whose task measures no accuracy (e.g. a regression)."""
    has_accuracy = any(math.isfinite(record["test_accuracy"]) for run in runs for record in run.records)
    return "test_accuracy" if has_accuracy else "test_loss"


def plot_accuracy(runs: Sequence[Run], x_axis: str, path: Path, title: str, target: float,
                  published: Sequence[PublishedPoint] = ()) -> None:
    """Test accuracy (test loss if the runs have no accuracy) per round of every run against x_axis:
    'uplink' or 'total' (cumulative bytes, log) or 'rounds' (with the published points as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = plotted_metric(runs)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    few_points = max(len(run.records) for run in runs) <= 30
    for run in runs:
        xs = (cumulative_bytes(run.records, x_axis) if x_axis != "rounds"
              else [record["round"] for record in run.records])
        axes.plot(xs, [record[metric] for record in run.records], label=run.name,
                  marker="o" if few_points else None, markersize=3, linewidth=1.5)
    if metric == "test_accuracy" and x_axis == "rounds":
        for series in dict.fromkeys(point.series for point in published):
            shown = [point for point in published if point.series == series]
            axes.scatter([point.round for point in shown], [point.accuracy for point in shown], marker="x", s=40,
                         zorder=3, label=f"{series} (published)")
    if metric == "test_accuracy":
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    if x_axis != "rounds":
        axes.set_xscale("log")
        axes.set_xlabel(f"cumulative {PLOTS[x_axis][1]} (bytes, log scale)")
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


def write_report(runs: Sequence[Run], out: Path, target: float, title: str,
                 published: Sequence[PublishedPoint] = ()) -> str:
    """Writes the plots (PLOTS) and report.md into `out`; returns the markdown tables (with the
    published points beside the runs' accuracy at the same rounds, when given)."""
    if not runs:
        raise ReportError("no runs to report")
    out.mkdir(parents=True, exist_ok=True)
    shown = plotted_metric(runs).replace("test_", "")
    for x_axis, (name, label) in PLOTS.items():
        plot_accuracy(runs, x_axis, out / name, f"{title}: {shown} vs {label}", target, published)
    table = format_table(build_rows(runs, target), target)
    if published:
        table += "\nPublished figures and each run's test accuracy at the same round:\n\n" + \
            published_table(published, runs)
    images = "\n".join(f"![accuracy vs {label}]({name})\n" for name, label in PLOTS.values())
    (out / "report.md").write_text(f"# {title}\n\n{table}\n{images}")
    return table
