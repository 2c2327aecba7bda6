"""Comparing runs: totals, rounds to a target accuracy, savings against a measured
delta = 0 run, and the markdown table of a report.

Pure functions over the records of metrics.jsonl, apart from reading folders and
drawing plots, so the numbers in a report can be checked on hand-written records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lbgm.report.runs import Run
from lbgm.server.accounting import summarize

# Settings that say where files go, how often state is saved and how evaluation is
# batched: they change neither the training nor the bytes, so runs are compared across them.
BOOKKEEPING_SETTINGS = frozenset({"name", "data_dir", "checkpoint_every", "eval_batch_size"})
# Settings that do not change what a delta = 0 run sends: every layer goes in full
# whatever the granularity, and there is no scalar residual to feed back.
IGNORED_FOR_BASELINE = BOOKKEEPING_SETTINGS | {"delta", "error_feedback", "granularity"}
ESTIMATED_MARK = "†"


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
    final_loss: float  # the last recorded test loss
    uplink_bytes: int
    savings: Savings
    target: TargetHit | None


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
            final_loss=last_test_loss(run.records), uplink_bytes=totals["uplink_bytes"], savings=savings(run, runs),
            target=rounds_to_target(run.records, target)))
    return rows


def last_test_loss(records: Sequence[dict[str, Any]]) -> float:
    """The test loss of the last round that recorded one (NaN if none did)."""
    losses = (record.get("test_loss", math.nan) for record in reversed(records))
    return next((loss for loss in losses if math.isfinite(loss)), math.nan)


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
    # A task that measures no accuracy (a regression, say): its test loss instead, and no target.
    accuracy = any(math.isfinite(row.final_accuracy) for row in rows)
    quality = ["final acc", "best acc"] if accuracy else ["final test loss"]
    targets = [f"rounds to {target:g}", f"uplink bytes to {target:g}"] if accuracy else []
    header = ["run", *keys, *quality, "uplink bytes", "savings vs delta=0", *targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        reached = ([str(row.target.round), f"{row.target.uplink_bytes:,}"] if row.target
                   else ["not reached", "not reached"])
        figures = [f"{row.final_accuracy:.4f}", f"{row.best_accuracy:.4f}"] if accuracy else [f"{row.final_loss:.4f}"]
        cells = [row.name, *(_cell(row.settings[key]) for key in keys), *figures, f"{row.uplink_bytes:,}",
                 _savings_cell(row.savings), *(reached if accuracy else [])]
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
