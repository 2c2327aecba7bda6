"""Byte accounting and the run's metrics files.

Every upload and download is counted as serialized stream messages (see
lbgm.common.wire), per worker and per message kind, including uploads that
were refused. `metrics.jsonl` gets one line per round; `summary.json` is
written at the end (atomically, so a reader never sees half a file). The
evaluation-only round after the last one (federated evaluation of the final
model) counts into the last round's line.
"""

from __future__ import annotations

import json
import math
import os
import resource
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Downlink message kinds: the round task, whole models, a global update's full layers and its scalars
# (update mode, issue 16), idle and finished replies. Reports list them in this order.
DOWNLINK_KINDS = ("task", "model", "update", "scalar", "control")


def resident_memory_bytes() -> int:
    """This process's resident set size now (Linux /proc), or its peak where /proc is missing."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class RoundLedger:
    uplink: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    downlink: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add_uplink(self, worker_id: int, bytes_by_kind: dict[str, int]) -> None:
        for kind, count in bytes_by_kind.items():
            self.uplink[worker_id][kind] += count

    def add_downlink(self, worker_id: int, kind: str, count: int) -> None:
        self.downlink[worker_id][kind] += count

    def merge(self, other: RoundLedger) -> None:
        """Add another ledger's counts (the evaluation-only round's to the last round's)."""
        for worker_id, kinds in other.uplink.items():
            self.add_uplink(worker_id, kinds)
        for worker_id, kinds in other.downlink.items():
            for kind, count in kinds.items():
                self.add_downlink(worker_id, kind, count)
        for reason, count in other.refused.items():
            self.refused[reason] += count

    @staticmethod
    def _total(table: dict[int, dict[str, int]]) -> int:
        return sum(sum(kinds.values()) for kinds in table.values())

    @staticmethod
    def _by_kind(table: dict[int, dict[str, int]]) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for kinds in table.values():
            for kind, count in kinds.items():
                totals[kind] += count
        return dict(totals)

    def as_record(self) -> dict[str, Any]:
        return {
            "uplink_bytes": self._total(self.uplink),
            "downlink_bytes": self._total(self.downlink),
            "uplink_by_kind": self._by_kind(self.uplink),
            "downlink_by_kind": self._by_kind(self.downlink),
            "uplink_by_worker": {str(w): dict(k) for w, k in sorted(self.uplink.items())},
            "downlink_by_worker": {str(w): dict(k) for w, k in sorted(self.downlink.items())},
            "refused": dict(self.refused),
        }


def write_json_atomic(path: Path, document: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class RunRecorder:
    """Appends round records to metrics.jsonl and writes summary.json."""

    def __init__(self, run_dir: Path, records: list[dict[str, Any]] | None = None) -> None:
        """Start metrics.jsonl afresh, or (resuming) with exactly the records of the checkpoint:
        lines of rounds the crashed server finished after its last checkpoint are dropped."""
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = list(records or [])
        self.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in self.records))

    def add_round(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        summary = {**summarize(self.records), **extra}
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def savings_fraction(sent_bytes: int, reference_bytes: int) -> float:
    """1 - sent / reference; 0 when there is nothing to compare against."""
    return 1.0 - sent_bytes / reference_bytes if reference_bytes else 0.0


def full_equivalent_downlink_bytes(record: dict[str, Any]) -> int:
    """The round's downlink had every worker that received a task got it with the whole float32 model
    (delta = 0 on the downlink), idle and finished replies as sent. Records written before the downlink
    could send less than the model lack the field: they did send it whole, so their bytes are their own."""
    return record.get("full_equivalent_downlink_bytes", record["downlink_bytes"])


def downlink_bytes_by_kind(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Downlink bytes per message kind (DOWNLINK_KINDS) over the rounds."""
    totals: dict[str, int] = defaultdict(int)
    for record in records:
        for kind, count in record.get("downlink_by_kind", {}).items():
            totals[kind] += count
    return dict(totals)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    records = list(records)
    uplink = sum(r["uplink_bytes"] for r in records)
    equivalent = sum(r["full_equivalent_uplink_bytes"] for r in records)
    downlink = sum(r["downlink_bytes"] for r in records)
    downlink_equivalent = sum(full_equivalent_downlink_bytes(r) for r in records)
    accuracies = [r["test_accuracy"] for r in records]
    measured = [a for a in accuracies if not math.isnan(a)]  # federated evaluation may skip rounds
    return {
        "rounds_completed": len(records),
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": (max(measured) if measured else math.nan) if accuracies else None,
        # Where the final accuracy comes from and which model it describes (see the round records).
        "final_accuracy_source": records[-1].get("test_source") if records else None,
        "final_accuracy_model_round": records[-1].get("test_model_round") if records else None,
        "uplink_bytes": uplink,
        "downlink_bytes": downlink,
        "full_equivalent_uplink_bytes": equivalent,
        "uplink_savings": savings_fraction(uplink, equivalent),
        "full_equivalent_downlink_bytes": downlink_equivalent,
        "downlink_savings": savings_fraction(downlink, downlink_equivalent),
        "total_bytes": uplink + downlink,
        "full_equivalent_total_bytes": equivalent + downlink_equivalent,
        "total_savings": savings_fraction(uplink + downlink, equivalent + downlink_equivalent),
        "downlink_bytes_by_kind": downlink_bytes_by_kind(records),
        "floats_uploaded": sum(r["floats_uploaded"] for r in records),
        "full_equivalent_floats": sum(r["full_equivalent_floats"] for r in records),
        "full_units": sum(r["full_units"] for r in records),
        "scalar_units": sum(r["scalar_units"] for r in records),
        # Decision units of the global updates broadcast (once per round, not per worker); 0 before them.
        "downlink_full_units": sum(r.get("downlink_full_units", 0) for r in records),
        "downlink_scalar_units": sum(r.get("downlink_scalar_units", 0) for r in records),
        "refused_uploads": sum(sum(r["refused"].values()) for r in records),
    }


def _size(count: int) -> str:
    """Bytes in MB, or kB and B for the small kinds (a run's few idle replies)."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _against_delta0(summary: dict[str, Any], direction: str) -> str:
    """'X MB (delta=0 would send Y MB: Z% saved)' for direction uplink, downlink or total."""
    sent, equivalent = summary[f"{direction}_bytes"], summary[f"full_equivalent_{direction}_bytes"]
    return (f"{sent / 1e6:.2f} MB (delta=0 would send {equivalent / 1e6:.2f} MB: "
            f"{100 * summary[f'{direction}_savings']:.1f}% saved)")


def format_summary(summary: dict[str, Any], run_dir: Path, wall_seconds: float) -> str:
    """The "LBGM run summary" block that `lbgm run` prints and `lbgm server` logs at the end of a run."""
    by_kind = summary["downlink_bytes_by_kind"]
    downlink_units = summary["downlink_scalar_units"] + summary["downlink_full_units"]
    rows = [
        ("rounds", f"{summary['rounds_completed']} in {wall_seconds:.1f} s"),
        ("test accuracy", f"final {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}"),
        ("uplink", _against_delta0(summary, "uplink")),
        ("downlink", _against_delta0(summary, "downlink")),
        ("downlink by kind", ", ".join(f"{kind} {_size(count)}" for kind, count in by_kind.items() if count)),
        ("total", _against_delta0(summary, "total")),
        ("decision units", f"{summary['scalar_units']} scalar, {summary['full_units']} full"),
        *([("downlink units", f"{summary['downlink_scalar_units']} scalar, {summary['downlink_full_units']} full "
                              f"(per broadcast)")] if downlink_units else []),
        ("floats uploaded", f"{summary['floats_uploaded']:,} (delta=0: {summary['full_equivalent_floats']:,})"),
        ("refused uploads", f"{summary['refused_uploads']}"),
        ("results", f"{run_dir}/metrics.jsonl, {run_dir}/summary.json"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["", "LBGM run summary", *(f"  {name:<{width}}  {value}" for name, value in rows)])
