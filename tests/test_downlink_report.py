"""Reporting the downlink (issue 16): bytes by kind and the saving against delta = 0, up, down and in
total, in summary.json, the run summary, Prometheus and lbgm report; on hand-written records and on a
real `lbgm run` whose summary and report must agree with its own metrics.jsonl."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbgm.report.comparison import Savings, TargetHit, build_rows, format_table, rounds_to_target, savings
from lbgm.report.runs import Run
from lbgm.server.accounting import format_summary, summarize
from lbgm.server.metrics import ServerMetrics
from lbgm.v1 import lbgm_pb2 as pb

from conftest import lbgm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(number: int, downlink_by_kind: dict[str, int], equivalent_downlink: int | None, units=(0, 0),
           uplink: int = 500, equivalent_uplink: int = 1000, accuracy: float = 0.5) -> dict:
    """A metrics.jsonl round; equivalent_downlink None writes a record as runs before issue 16 did
    (no full_equivalent_downlink_bytes, no downlink units)."""
    downlink = {"downlink_bytes": sum(downlink_by_kind.values()), "downlink_by_kind": downlink_by_kind}
    if equivalent_downlink is not None:
        downlink |= {"full_equivalent_downlink_bytes": equivalent_downlink,
                     "downlink_scalar_units": units[0], "downlink_full_units": units[1]}
    return {"round": number, "test_accuracy": accuracy, "uplink_bytes": uplink,
            "full_equivalent_uplink_bytes": equivalent_uplink, "floats_uploaded": 0, "full_equivalent_floats": 0,
            "full_units": 0, "scalar_units": 0, "refused": {}, "round_seconds": 0.5, "clipped_updates": 0,
            "round_discarded": False, **downlink}


# Round 1 sends two workers the whole model; round 2 sends them the global update: one layer in full, three
# as scalars. delta = 0 would have sent the whole model (1,000 bytes a worker, 20 of task) both times.
UPDATE_MODE = [record(1, {"task": 40, "model": 2000}, 2040, units=(0, 4)),
               record(2, {"task": 40, "update": 600, "scalar": 24}, 2040, units=(3, 1))]
# The same rounds as a run before issue 16 recorded them: the whole model every round, nothing else.
OLDER_RUN = [record(1, {"task": 40, "model": 2000}, None), record(2, {"task": 40, "model": 2000}, None)]


def run(name: str, records: list[dict], **settings) -> Run:
    config = {"name": name, "delta": 0.2, "downlink_delta": 0.2, "downlink_dtype": "float32", "seed": 0, **settings}
    return Run(name, Path(name), config, tuple(records))


# ------------------------------------------------------------------ summary.json

def test_summary_totals_the_downlink_by_kind_and_saves_against_its_delta0_equivalent():
    summary = summarize(UPDATE_MODE)
    assert summary["downlink_bytes"] == 2704 and summary["full_equivalent_downlink_bytes"] == 4080
    assert summary["downlink_bytes_by_kind"] == {"task": 80, "model": 2000, "update": 600, "scalar": 24}
    assert math.isclose(summary["downlink_savings"], 1 - 2704 / 4080)
    assert summary["total_bytes"] == 1000 + 2704 and summary["full_equivalent_total_bytes"] == 2000 + 4080
    assert math.isclose(summary["total_savings"], 1 - 3704 / 6080)
    assert (summary["downlink_scalar_units"], summary["downlink_full_units"]) == (3, 5)


def test_an_older_runs_downlink_is_its_own_equivalent_and_saves_nothing():
    summary = summarize(OLDER_RUN)
    assert summary["full_equivalent_downlink_bytes"] == summary["downlink_bytes"] == 4080
    assert summary["downlink_savings"] == 0.0
    assert math.isclose(summary["total_savings"], 1 - (1000 + 4080) / (2000 + 4080))
    assert (summary["downlink_scalar_units"], summary["downlink_full_units"]) == (0, 0)


def summary_rows(text: str) -> dict[str, str]:
    """The run summary's rows, name -> value (names may hold single spaces; two or more end them)."""
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines() if line.startswith("  "))


def test_run_summary_shows_the_downlink_by_kind_and_the_total_saved():
    rows = summary_rows(format_summary(summarize(UPDATE_MODE), Path("runs/x"), 1.0))
    assert rows["downlink"] == "0.00 MB (delta=0 would send 0.00 MB: 33.7% saved)"
    assert rows["downlink by kind"] == "task 80 B, model 2.00 kB, update 600 B, scalar 24 B"
    assert rows["total"] == "0.00 MB (delta=0 would send 0.01 MB: 39.1% saved)"
    assert rows["downlink units"] == "3 scalar, 5 full (per broadcast)"
    older = summary_rows(format_summary(summarize(OLDER_RUN), Path("runs/x"), 1.0))
    assert older["downlink"].endswith("0.0% saved)") and "downlink units" not in older


# ------------------------------------------------------------------ lbgm report

def test_report_savings_each_way_against_a_measured_baseline_that_is_delta0_both_ways():
    lbgm_run = run("lbgm", UPDATE_MODE)
    uplink_only = run("uplink-only", OLDER_RUN, delta=0.0)  # delta 0 up, but LBGM on the downlink: no baseline
    half_float = run("float16", OLDER_RUN, delta=0.0, downlink_delta=0.0, downlink_dtype="float16")
    assert savings(lbgm_run, [lbgm_run, uplink_only, half_float]).baseline is None
    older_baseline = Run("fedavg", Path("fedavg"), {"name": "fedavg", "delta": 0.0, "seed": 0},  # before the downlink
                         tuple(record(n, {"task": 36, "model": 2000}, None, uplink=1000) for n in (1, 2)))
    measured = savings(lbgm_run, [lbgm_run, uplink_only, half_float, older_baseline])
    assert measured == Savings(uplink=0.5, downlink=1 - 2704 / 4072, total=1 - 3704 / 6072, baseline="fedavg")


def test_report_without_a_baseline_saves_against_the_runs_own_equivalents_and_reaches_targets_in_total_bytes():
    records = [{**r, "test_accuracy": accuracy} for r, accuracy in zip(UPDATE_MODE, (0.4, 0.9))]
    assert savings(run("lbgm", records), []) == Savings(
        uplink=0.5, downlink=1 - 2704 / 4080, total=1 - 3704 / 6080, baseline=None)
    assert rounds_to_target(records, 0.9) == TargetHit(round=2, uplink_bytes=1000, total_bytes=3704)


def test_report_tables_give_each_directions_bytes_and_the_downlink_by_kind():
    table = format_table(build_rows([run("lbgm", UPDATE_MODE), run("older", OLDER_RUN, delta=0.3)], 0.9), 0.9)
    lines = table.splitlines()
    assert lines[0] == ("| run | delta | final acc | best acc | uplink bytes | uplink saved | downlink bytes | "
                        "downlink saved | total bytes | total saved | rounds to 0.9 | uplink bytes to 0.9 | "
                        "total bytes to 0.9 |")
    assert lines[2] == ("| lbgm | 0.2 | 0.5000 | 0.5000 | 1,000 | 50.0% † | 2,704 | 33.7% † | 3,704 | 39.1% † | "
                        "not reached | not reached | not reached |")
    assert "| older | 0.3 | 0.5000 | 0.5000 | 1,000 | 50.0% † | 4,080 | 0.0% † | 5,080 | 16.4% † |" in lines[3]
    by_kind = lines[lines.index("| run | task | model | update | scalar | downlink units (scalar / full) |"):]
    assert by_kind[2:] == ["| lbgm | 80 | 2,000 | 600 | 24 | 3 / 5 |", "| older | 80 | 4,000 | 0 | 0 | 0 / 0 |"]


# ------------------------------------------------------------------ Prometheus

def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_exports_every_downlink_kind_and_the_delta0_equivalents_per_recorded_round():
    metrics = ServerMetrics(pb.StatusReply, lambda: 0, round_timeout=10.0)
    before = samples(metrics)
    for kind in ("task", "model", "update", "scalar", "control"):
        assert before[("lbgm_downlink_bytes_total", (("kind", kind),))] == 0  # a late series would break rate()
    for the_round in (*UPDATE_MODE, OLDER_RUN[0]):
        for kind, count in the_round["downlink_by_kind"].items():
            metrics.downlink(kind, count)
        metrics.round_recorded(the_round)
    after = samples(metrics)
    assert after[("lbgm_full_equivalent_bytes_total", (("direction", "down"),))] == 4080 + 2040
    assert after[("lbgm_full_equivalent_bytes_total", (("direction", "up"),))] == 3000
    assert after[("lbgm_downlink_bytes_total", (("kind", "scalar"),))] == 24
    assert after[("lbgm_downlink_units_total", (("kind", "scalar"),))] == 3
    assert after[("lbgm_downlink_units_total", (("kind", "full"),))] == 5
    sent = sum(value for (name, _), value in after.items() if name == "lbgm_downlink_bytes_total")
    assert sent == 2704 + 2040  # the dashboard's saving: 1 - sent / equivalent


# ------------------------------------------------------------------ a real run

def percent_saved(sent: int, equivalent: int) -> str:
    return f"{100 * (1 - sent / equivalent):.1f}%"


@pytest.mark.parametrize("downlink_args, kinds", [
    ([], ["task", "model"]),  # the defaults: the whole model every round, as before issue 16
    (["--downlink-delta", "0.5"], ["task", "model", "update", "scalar"]),  # update mode: round 1 whole, then updates
], ids=["whole-model", "update-mode"])
def test_a_real_runs_summary_and_report_agree_with_its_records(tmp_path, downlink_args, kinds):
    result = subprocess.run(
        lbgm("run", "--model", "mlp", "--workers", "3", "--processes", "1", "--rounds", "4", "--local-steps", "1",
             "--batch-size", "0", "--local-lr", "0.5", "--delta", "0.5", *downlink_args, "--name", "down",
             "--out-dir", str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "down"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    by_kind: dict[str, int] = {}
    for the_round in records:
        for kind, count in the_round["downlink_by_kind"].items():
            by_kind[kind] = by_kind.get(kind, 0) + count
    downlink, total = sum(r["downlink_bytes"] for r in records), summary["total_bytes"]
    equivalent = sum(r["full_equivalent_downlink_bytes"] for r in records)
    units = [sum(r[f"downlink_{kind}_units"] for r in records) for kind in ("scalar", "full")]
    assert [kind for kind, count in by_kind.items() if count] == kinds and sum(by_kind.values()) == downlink
    assert summary["downlink_bytes_by_kind"] == by_kind and total == summary["uplink_bytes"] + downlink
    assert summary["full_equivalent_downlink_bytes"] == equivalent
    assert [summary["downlink_scalar_units"], summary["downlink_full_units"]] == units
    if not downlink_args:
        assert equivalent == downlink
    printed = summary_rows(result.stdout.split("LBGM run summary")[1])
    assert printed["downlink"] == (f"{downlink / 1e6:.2f} MB (delta=0 would send {equivalent / 1e6:.2f} MB: "
                                   f"{percent_saved(downlink, equivalent)} saved)")
    total_saved = percent_saved(total, summary["full_equivalent_total_bytes"])
    assert printed["total"] == (f"{total / 1e6:.2f} MB (delta=0 would send "
                                f"{summary['full_equivalent_total_bytes'] / 1e6:.2f} MB: {total_saved} saved)")
    assert f"model {by_kind['model'] / 1e6:.2f} MB" in printed["downlink by kind"]
    logged = summary_rows((run_dir / "logs" / "server.log").read_text().split("LBGM run summary")[1])
    assert {key: logged[key] for key in ("downlink", "downlink by kind", "total")} == {
        key: printed[key] for key in ("downlink", "downlink by kind", "total")}  # lbgm server logs it too

    out = tmp_path / "report"
    report = subprocess.run(lbgm("report", str(run_dir), "--out", str(out), "--target-accuracy", "0.1"),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| down |")]
    assert f"| {downlink:,} | {percent_saved(downlink, equivalent)} † | {total:,} | {total_saved} † |" in rows[0]
    assert rows[1] == "| down | " + " | ".join(f"{by_kind[kind]:,}" for kind in kinds) + f" | {units[0]} / {units[1]} |"
    for plot in ("accuracy_vs_uplink.png", "accuracy_vs_total_bytes.png", "accuracy_vs_rounds.png"):
        assert (out / plot).read_bytes().startswith(PNG_SIGNATURE)
