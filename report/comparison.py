"""Comparing runs: totals, rounds to a target accuracy, savings against a measured
delta = 0 run (uplink, downlink and both together), and the markdown tables of a report.

Pure functions over the records of metrics.jsonl, apart from reading folders and
drawing plots, so the numbers in a report can be checked on hand-written records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lbgm.report.runs import Run
from lbgm.server.accounting import DOWNLINK_KINDS, savings_fraction, summarize

# Settings that say where files go, how often state is saved and how evaluation is
# batched: they change neither the training nor the bytes, so runs are compared across them.
BOOKKEEPING_SETTINGS = frozenset({"name", "data_dir", "checkpoint_every", "eval_batch_size"})
# The settings of a delta = 0 run, both ways: every upload in full, and every worker the whole
# float32 model. Configs written before the downlink settings existed did exactly that.
DELTA0_SETTINGS = {"delta": 0, "downlink_delta": 0, "downlink_dtype": "float32"}
# Settings a delta = 0 baseline may differ in: its delta settings, and those that do not change what
# a delta = 0 run sends (every layer goes in full whatever the granularity, and there is no scalar
# residual to feed back).
IGNORED_FOR_BASELINE = BOOKKEEPING_SETTINGS | DELTA0_SETTINGS.keys() | {"error_feedback", "granularity"}
ESTIMATED_MARK = "†"
DIRECTIONS = ("uplink", "downlink", "total")  # Savings' fields, in order


@dataclass(frozen=True)
class TargetHit:
    """The first round whose test accuracy reached the target, and the bytes spent until then."""

    round: int
    uplink_bytes: int
    total_bytes: int  # uplink and downlink


@dataclass(frozen=True)
class Savings:
    """Bytes saved against delta = 0 (1 - sent / delta = 0's) up, down and both together; `baseline`
    names the measured delta = 0 run, or is None when the run's own delta = 0 equivalents stood in for it."""

    uplink: float
    downlink: float
    total: float
    baseline: str | None


@dataclass(frozen=True)
class Row:
    name: str
    settings: dict[str, Any]
    final_accuracy: float
    best_accuracy: float
    final_loss: float  # the last recorded test loss
    uplink_bytes: int
    downlink_bytes: int
    downlink_by_kind: dict[str, int]
    downlink_units: tuple[int, int]  # (scalar, full) decision units of the broadcast global updates
    savings: Savings
    target: TargetHit | None


def cumulative_bytes(records: Iterable[dict[str, Any]], direction: str = "uplink") -> list[int]:
    """Bytes sent up to and including each round: direction 'uplink', 'downlink' or 'total' (both)."""
    keys = ("uplink_bytes", "downlink_bytes") if direction == "total" else (f"{direction}_bytes",)
    total, running = 0, []
    for record in records:
        total += sum(record[key] for key in keys)
        running.append(total)
    return running


def rounds_to_target(records: Sequence[dict[str, Any]], target: float) -> TargetHit | None:
    """The first round with test accuracy >= target (reaching it exactly counts), or None."""
    for record, uplink, total in zip(records, cumulative_bytes(records), cumulative_bytes(records, "total")):
        if record["test_accuracy"] >= target:
            return TargetHit(record["round"], uplink, total)
    return None


def is_delta0(config: dict[str, Any]) -> bool:
    """Whether a run sent everything in full both ways (settings it lacks have their delta = 0 value)."""
    return all(config.get(key, value) == value for key, value in DELTA0_SETTINGS.items())


def same_but_delta(config: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two configs differ only in settings that a delta = 0 baseline may differ in."""
    keys = (config.keys() | other.keys()) - IGNORED_FOR_BASELINE
    return all(config.get(key) == other.get(key) for key in keys)


def find_baseline(run: Run, runs: Sequence[Run]) -> Run | None:
    """A measured delta = 0 run with otherwise identical settings and as many completed rounds."""
    for candidate in runs:
        if (is_delta0(candidate.config) and len(candidate.records) == len(run.records)
                and same_but_delta(run.config, candidate.config)):
            return candidate
    return None


def savings(run: Run, runs: Sequence[Run]) -> Savings:
    """Savings against the measured delta = 0 twin if the set holds one, else against the run's own
    delta = 0 equivalents (the serialized size of an all-full upload, of the whole model to every receiver)."""
    totals = summarize(run.records)
    baseline = find_baseline(run, runs)
    if baseline is None:
        reference, name = {direction: totals[f"full_equivalent_{direction}_bytes"] for direction in DIRECTIONS}, None
    else:
        measured = summarize(baseline.records)
        reference, name = {direction: measured[f"{direction}_bytes"] for direction in DIRECTIONS}, baseline.name
    return Savings(*(savings_fraction(totals[f"{direction}_bytes"], reference[direction])
                     for direction in DIRECTIONS), name)


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
            final_loss=last_test_loss(run.records), uplink_bytes=totals["uplink_bytes"],
            downlink_bytes=totals["downlink_bytes"], downlink_by_kind=totals["downlink_bytes_by_kind"],
            downlink_units=(totals["downlink_scalar_units"], totals["downlink_full_units"]),
            savings=savings(run, runs), target=rounds_to_target(run.records, target)))
    return rows


def last_test_loss(records: Sequence[dict[str, Any]]) -> float:
    """The test loss of the last round that recorded one (NaN if none did)."""
    losses = (record.get("test_loss", math.nan) for record in reversed(records))
    return next((loss for loss in losses if math.isfinite(loss)), math.nan)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "-" if value is None else str(value)


def _savings_cell(fraction: float, baseline: str | None) -> str:
    percent = f"{100 * fraction:.1f}%"
    return percent if baseline is not None else f"{percent} {ESTIMATED_MARK}"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def format_table(rows: Sequence[Row], target: float) -> str:
    """The markdown tables of a report: bytes each way and savings, with footnotes for estimated savings,
    then the downlink's bytes by message kind."""
    keys = list(rows[0].settings) if rows else []
    # A task that measures no accuracy (a regression, say): its test loss instead, and no target.
    accuracy = any(math.isfinite(row.final_accuracy) for row in rows)
    quality = ["final acc", "best acc"] if accuracy else ["final test loss"]
    targets = [f"rounds to {target:g}", f"uplink bytes to {target:g}", f"total bytes to {target:g}"] if accuracy else []
    header = ["run", *keys, *quality, *(f"{direction} {figure}" for direction in DIRECTIONS
                                        for figure in ("bytes", "saved")), *targets]
    cells = []
    for row in rows:
        reached = ([str(row.target.round), f"{row.target.uplink_bytes:,}", f"{row.target.total_bytes:,}"]
                   if row.target else ["not reached"] * 3)
        figures = [f"{row.final_accuracy:.4f}", f"{row.best_accuracy:.4f}"] if accuracy else [f"{row.final_loss:.4f}"]
        sent = (row.uplink_bytes, row.downlink_bytes, row.uplink_bytes + row.downlink_bytes)
        saved = (row.savings.uplink, row.savings.downlink, row.savings.total)
        cells.append([row.name, *(_cell(row.settings[key]) for key in keys), *figures,
                      *(text for count, fraction in zip(sent, saved)
                        for text in (f"{count:,}", _savings_cell(fraction, row.savings.baseline))),
                      *(reached if accuracy else [])])
    by_kind = _downlink_table(rows)
    tables = [*_markdown_table(header, cells), "", *_footnotes(rows), *([""] + by_kind if by_kind else [])]
    return "\n".join(tables) + "\n"


def _downlink_table(rows: Sequence[Row]) -> list[str]:
    """Downlink bytes per message kind, the kinds any run sent, and the broadcast's units where it had any;
    nothing for records that name no kinds."""
    sent = {kind for row in rows for kind, count in row.downlink_by_kind.items() if count}
    kinds = [kind for kind in DOWNLINK_KINDS if kind in sent] + sorted(sent - set(DOWNLINK_KINDS))
    units = any(sum(row.downlink_units) for row in rows)
    if not kinds and not units:
        return []
    header = ["run", *kinds, *(["downlink units (scalar / full)"] if units else [])]
    cells = [[row.name, *(f"{row.downlink_by_kind.get(kind, 0):,}" for kind in kinds),
              *([f"{row.downlink_units[0]} / {row.downlink_units[1]}"] if units else [])] for row in rows]
    return ["Downlink bytes by message kind (task: the round's settings; model: whole models; update and scalar: "
            "the global update's full and scalar layers; control: idle and finished replies):", "",
            *_markdown_table(header, cells)]


def _footnotes(rows: Sequence[Row]) -> list[str]:
    notes = ["Saved: 1 - bytes sent / the bytes of delta = 0 (every upload in full, the whole float32 model to "
             "every worker), uplink, downlink and both together (total)."]
    measured = [f"{row.name} vs {row.savings.baseline}" for row in rows
                if row.savings.baseline not in (None, row.name)]
    if measured:
        notes.append("Savings compare measured bytes with the delta = 0 run of otherwise identical "
                     f"settings: {'; '.join(measured)}.")
    if any(row.savings.baseline is None for row in rows):
        notes.append(f"{ESTIMATED_MARK} No delta = 0 run with otherwise identical settings and as many rounds "
                     "in this set: savings against the run's own delta = 0 equivalent (the serialized size "
                     "of an all-full upload by the same participants, and of the whole model sent to every "
                     "worker that received one).")
    return notes
