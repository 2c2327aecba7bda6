"""The files of the gradient-space analysis (`lbgm analyze-gradients`): gradient_space.json
(every count), gradient_space.md (the final table), gradient_space.png (N95 and N99 against
epoch or round, one panel per layer, with the ceiling N = epochs, capped at the layer's values) and
gradient_space_grams.safetensors (each series' raw Gram matrix and row sums per layer, from
which `--recount` counts again under another treatment without retraining). Central training
and the federated run (`--federated`) write the same four files. The analysis itself is
lbgm.sim.gradient_space."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import matplotlib
import torch
from matplotlib.figure import Figure
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from matplotlib.ticker import MaxNLocator

from lbgm.experiment.config import ExperimentConfig
from lbgm.report.runs import ReportError
from lbgm.sim.gradient_space import (
    FRACTIONS, AnalysisSettings, FederatedReport, FederatedSettings, GradientSpaceReport, LayerSpectrum, RawGram,
    Treatment, recounted, worker_counts,
)

OUTPUT_FILES = ("gradient_space.json", "gradient_space.md", "gradient_space.png", "gradient_space_grams.safetensors")
CENTRAL = "central"  # the series name of central training in the grams file


def meaning(treatment: Treatment, unit: str) -> str:
    """What the counts are, for the table's foot: `unit` is epoch or round."""
    centering = "centered: each gradient minus its mean over its own entries" if treatment.centered else "uncentered"
    rows = (f"the momentum sums v = {treatment.momentum:g} v_prev + g of the per-{unit} gradients" if treatment.momentum
            else f"the per-{unit} gradients")
    if treatment.unit_rows:
        rows += ", each scaled to length 1"
    return (f"N95 / N99: the fewest principal components ({centering}, per layer) of {rows} of all {unit}s so far "
            f"that explain 95% / 99% of their variance; at most the number of {unit}s. Small values mean new "
            f"gradients stay in the span of old ones, which LBGM exploits.")


def treatment_json(treatment: Treatment) -> dict:
    return {"momentum": treatment.momentum, "centered": treatment.centered, "unit_rows": treatment.unit_rows}


def layers_json(layers: tuple[LayerSpectrum, ...]) -> list[dict]:
    return [{"name": layer.name, "values": layer.num_values, "n95": list(layer.n95), "n99": list(layer.n99)}
            for layer in layers]


def report_json(report: GradientSpaceReport) -> dict:
    settings = report.settings
    return {
        "settings": {"dataset": settings.dataset, "model": settings.model, "epochs": settings.epochs,
                     "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed,
                     "max_samples": settings.max_samples, "weight_decay": settings.weight_decay},
        "train_samples": report.train_samples,
        **treatment_json(settings.treatment),
        "fractions": list(FRACTIONS),
        "epoch_losses": list(report.epoch_losses),
        "test_accuracy": report.test_accuracy,
        "layers": layers_json(report.layers),
    }


def markdown_table(report: GradientSpaceReport) -> str:
    """The final-epoch counts, one row per parameter tensor, and what they mean."""
    settings = report.settings
    epochs = settings.epochs
    lines = [
        f"Gradient space of {settings.model} on {settings.dataset} ({report.train_samples} training samples, "
        f"batch {settings.batch_size}, lr {settings.lr}, weight decay {settings.weight_decay:g}, seed {settings.seed}; "
        f"test accuracy after epoch {epochs}: {report.test_accuracy:.4f})",
        "",
        "| layer | values | N95 | N99 | epochs |",
        "|---|---:|---:|---:|---:|",
        *(f"| {layer.name} | {layer.num_values:,} | {layer.n95[-1]} | {layer.n99[-1]} | {epochs} |"
          for layer in report.layers),
        "",
        meaning(settings.treatment, "epoch"),
    ]
    return "\n".join(lines) + "\n"


Curves = dict[str, Sequence[float]]  # label -> count after each epoch or round


def pyplot() -> ModuleType:
    matplotlib.use("Agg")  # files only: no display on servers and in tests; must precede pyplot
    from matplotlib import pyplot as plt

    return plt


def panels_figure(layers: Sequence[LayerSpectrum], curves: Sequence[Curves], unit: str, title: str) -> Figure:
    """One panel per layer with its curves against epoch (or round) and the ceiling N = epochs (or values)."""
    plt = pyplot()
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    # At least 10 inches wide and with room below and above, so that the legend and title fit beside one panel.
    height = 2.9 * rows + 1.2
    figure, axes = plt.subplots(rows, columns, figsize=(max(3.4 * columns, 10.0), height), squeeze=False, sharex=True)
    for axis, layer, layer_curves in zip(axes.flat, layers, curves):
        steps = list(range(1, max(len(values) for values in layer_curves.values()) + 1))
        # No count exceeds the rows so far nor the layer's values. Drawn above the curves, so that it
        # stays visible where a count reaches it.
        axis.plot(steps, [min(step, layer.num_values) for step in steps], color="0.35", linestyle=":", zorder=5,
                  label=f"ceiling: N = {unit}s (at most the layer's values)")
        # A label is "<series> N95" or "<series> N99": one colour per series, N95 dashed.
        series = list(dict.fromkeys(label[:-3] for label in layer_curves))
        for label, values in layer_curves.items():
            axis.plot(steps[:len(values)], values, marker="o" if len(steps) <= 20 else None, markersize=3, label=label,
                      color=f"C{series.index(label[:-3])}", linestyle="--" if label.endswith("N95") else "-")
        axis.set_title(f"{layer.name} ({layer.num_values:,} values)", fontsize=9)
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(layers):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel(unit)
    for axis in axes[:, 0]:
        axis.set_ylabel("components")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    legend_rows = math.ceil(len(labels) / 3)
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.suptitle(title, x=0.02, ha="left", fontsize=10)
    figure.tight_layout(rect=(0, (0.2 + 0.17 * legend_rows) / height, 1, 1 - 0.4 / height))
    return figure


def report_figure(report: GradientSpaceReport) -> Figure:
    """N95 and N99 against epoch, one panel per layer, with the N = epochs ceiling."""
    settings = report.settings
    return panels_figure(report.layers, [{"N99": layer.n99, "N95": layer.n95} for layer in report.layers], "epoch",
                         f"Principal components of per-epoch gradients: {settings.model} on {settings.dataset}")


def median_curve(spectra: Sequence[LayerSpectrum], count: str) -> list[float]:
    """Per round, the median over the workers that have a count for it; `count` is "n95" or "n99"."""
    counts = [getattr(spectrum, count) for spectrum in spectra]
    return [statistics.median(c[i] for c in counts if i < len(c)) for i in range(max(map(len, counts)))]


def federated_figure(report: FederatedReport) -> Figure:
    """Per layer: the aggregate's and the global update's N95/N99 and the tracked workers' median, by round."""
    curves = []
    for index, (aggregate, update) in enumerate(zip(report.aggregate, report.global_update, strict=True)):
        workers = [layers[index] for layers in report.workers.values()]
        curves.append({"aggregate N99": aggregate.n99, "aggregate N95": aggregate.n95,
                       "global update N99": update.n99, "global update N95": update.n95,
                       "workers' median N99": median_curve(workers, "n99"),
                       "workers' median N95": median_curve(workers, "n95")})
    config = report.settings.config
    return panels_figure(report.aggregate, curves, "round",
                         f"Principal components of per-round gradients in a federation: {config.model} on "
                         f"{config.dataset}, {config.workers} workers, delta {config.delta:g}")


def federated_json(report: FederatedReport) -> dict:
    settings = report.settings
    config = settings.config
    return {
        "config": dataclasses.asdict(config),
        "track_workers": settings.track_workers,
        **treatment_json(settings.treatment),
        "fractions": list(FRACTIONS),
        "test_accuracy": report.test_accuracy,
        "aggregate": layers_json(report.aggregate),
        "global_update": layers_json(report.global_update),
        "workers": {str(k): layers_json(layers) for k, layers in report.workers.items()},
    }


def federated_table(report: FederatedReport) -> str:
    """Per layer: the tracked workers' final counts (median, max), the aggregate's and the global update's."""
    config = report.settings.config
    rounds = len(report.aggregate[0].n95)
    lines = [
        f"Gradient space within a federation: {config.model} on {config.dataset}, {config.workers} workers "
        f"({config.partition} partition), {config.rounds} rounds, delta {config.delta:g}, {config.local_steps} local "
        f"step(s), batch {config.batch_size or 'whole shard'}, lr {config.local_lr:g}, server momentum "
        f"{config.server_momentum:g}, seed {config.seed}; {len(report.workers)} tracked workers; "
        f"final test accuracy {report.test_accuracy:.4f}",
        "",
        "| layer | values | workers N95 median / max | workers N99 median / max | aggregate N95 | aggregate N99 "
        "| global update N95 | global update N99 | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {w.name} | {w.num_values:,} | {w.n95_median:g} / {w.n95_max} | {w.n99_median:g} / {w.n99_max} "
          f"| {a.n95[-1]} | {a.n99[-1]} | {u.n95[-1]} | {u.n99[-1]} | {rounds} |"
          for w, a, u in zip(worker_counts(report), report.aggregate, report.global_update, strict=True)),
        "",
        meaning(report.settings.treatment, "round"),
        "Workers: each tracked worker's true gradient (before LBGM) of every round it took part in. Aggregate: the "
        "sample-weighted mean of all sampled workers' true gradients (what the server averages when delta = 0 and "
        "no update is clipped). Global update: theta_t - theta_(t+1), the server's step, with its momentum.",
    ]
    return "\n".join(lines) + "\n"


def series_grams(report: GradientSpaceReport | FederatedReport) -> dict[str, tuple[RawGram, ...]]:
    return report.grams if isinstance(report, FederatedReport) else {CENTRAL: report.grams}


def grams_tensors(report: GradientSpaceReport | FederatedReport) -> dict[str, torch.Tensor]:
    """The raw Gram matrices and row sums, keyed <series>/<layer>/gram and <series>/<layer>/row_sums."""
    return {f"{series}/{raw.name}/{part}": getattr(raw, part).contiguous()
            for series, grams in series_grams(report).items() for raw in grams for part in ("gram", "row_sums")}


def load_report(folder: Path, treatment: Treatment) -> GradientSpaceReport | FederatedReport:
    """An earlier run's report from its json and grams files, counted under `treatment` (no retraining)."""
    json_path, grams_path = folder / OUTPUT_FILES[0], folder / OUTPUT_FILES[3]
    try:
        document = json.loads(json_path.read_text())
        tensors = load_file(grams_path)
    except (OSError, ValueError, SafetensorError) as error:
        raise ReportError(f"cannot read the analysis in {folder}: {error}") from None

    def grams(series: str, layers: list[dict]) -> tuple[RawGram, ...]:
        try:
            return tuple(RawGram(layer["name"], layer["values"], tensors[f"{series}/{layer['name']}/gram"],
                                 tensors[f"{series}/{layer['name']}/row_sums"]) for layer in layers)
        except KeyError as error:
            raise ReportError(f"{grams_path} lacks {error}; is it the grams file of {json_path}?") from None

    if "config" in document:
        series = {name: grams(name, document[name]) for name in ("aggregate", "global_update")}
        series.update({f"worker_{k}": grams(f"worker_{k}", layers) for k, layers in document["workers"].items()})
        settings = FederatedSettings(config=ExperimentConfig(**document["config"]),
                                     track_workers=document["track_workers"])
        report = FederatedReport(settings=settings, grams=series, spectra={}, test_accuracy=document["test_accuracy"])
    else:
        settings = AnalysisSettings(**document["settings"])
        central = grams(CENTRAL, document["layers"])
        report = GradientSpaceReport(settings=settings, train_samples=document["train_samples"],
                                     epoch_losses=tuple(document["epoch_losses"]),
                                     test_accuracy=document["test_accuracy"], grams=central, layers=())
    return recounted(report, treatment)


def write_outputs(report: GradientSpaceReport | FederatedReport, out: Path) -> str:
    """Write the four files to `out` (created); returns the markdown."""
    federated = isinstance(report, FederatedReport)
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, plot_path, grams_path = (out / name for name in OUTPUT_FILES)
    save_file(grams_tensors(report), grams_path)
    json_path.write_text(json.dumps(federated_json(report) if federated else report_json(report), indent=2) + "\n")
    markdown = federated_table(report) if federated else markdown_table(report)
    markdown_path.write_text(markdown)
    figure = federated_figure(report) if federated else report_figure(report)
    figure.savefig(plot_path, dpi=120)
    pyplot().close(figure)
    return markdown
