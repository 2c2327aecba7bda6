"""Accuracy figures published elsewhere (another implementation's run, a paper's table), set beside
ours: read from a CSV file of `series,round,accuracy` rows, drawn as markers on the accuracy-vs-rounds
plot and tabled against each run's accuracy at the same round."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lbgm.report.runs import ReportError, Run

COLUMNS = ("series", "round", "accuracy")


@dataclass(frozen=True)
class PublishedPoint:
    """One published figure: `series` (e.g. "reference FedAvg") had `accuracy` after `round` rounds."""

    series: str
    round: int
    accuracy: float


def read_published(path: Path) -> tuple[PublishedPoint, ...]:
    """The points of a CSV file with the header series,round,accuracy; a bad file: one ReportError
    naming the file and line."""
    try:
        with path.open(newline="") as stream:
            rows = list(csv.reader(stream))
    except OSError as error:
        raise ReportError(f"cannot read published points {path}: {error.strerror or error}") from None
    if not rows or tuple(cell.strip() for cell in rows[0]) != COLUMNS:
        raise ReportError(f"{path}: the first line must be the header {','.join(COLUMNS)}")
    points = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            series, round_text, accuracy_text = (cell.strip() for cell in row)
            point = PublishedPoint(series, int(round_text), float(accuracy_text))
        except ValueError:
            raise ReportError(f"{path}:{line}: expected series,round,accuracy with an integer round and a "
                              f"number accuracy, got {','.join(row)!r}") from None
        if not series or point.round < 0 or not (math.isfinite(point.accuracy) and 0 <= point.accuracy <= 1):
            raise ReportError(f"{path}:{line}: needs a series name, a round >= 0 and an accuracy in [0, 1], "
                              f"got {','.join(row)!r}")
        points.append(point)
    if not points:
        raise ReportError(f"{path}: no points after the header")
    return tuple(points)


def accuracy_at(run: Run, round_number: int) -> float | None:
    """The run's test accuracy after `round_number` rounds (None if it has no record of that round)."""
    return next((record["test_accuracy"] for record in run.records if record["round"] == round_number), None)


def published_table(points: Sequence[PublishedPoint], runs: Sequence[Run]) -> str:
    """Markdown: each published point, then every run's accuracy at its round."""
    header = ["published", "round", "accuracy", *(run.name for run in runs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in points:
        ours = [accuracy_at(run, point.round) for run in runs]
        cells = [point.series, str(point.round), f"{point.accuracy:.4f}",
                 *("-" if value is None else f"{value:.4f}" for value in ours)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
