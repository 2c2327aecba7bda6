"""The benchmark scripts run end to end at tiny sizes and report consistent numbers
(what they measure is not checked here: timings belong to bench/, not to tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=True)


def test_transport_reports_positive_throughput_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    printed = run_bench("transport", "--sizes", "100k", "--repeats", "1", "--out", str(out)).stdout
    [row] = json.loads(out.read_text())["results"]
    assert row["floats"] == 100_000 and row["payload_bytes"] == 400_000
    assert row["raw_mb_per_s"] > 0 and row["grpc_mb_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["grpc_mb_per_s"] / row["raw_mb_per_s"])
    assert row["meets_target"] is None  # the target is stated for 10M values and more
    assert "| 100,000 |" in printed


def test_healthcheck_measures_both_ways_against_a_running_server(tmp_path: Path) -> None:
    out = tmp_path / "healthcheck.json"
    run_bench("healthcheck", "--repeats", "1", "--out", str(out))
    results = json.loads(out.read_text())
    light, full = results["lbgm health (light entry point)"], results["through lbgm.cli.main (before)"]
    assert light["runs"] == full["runs"] == 1 and light["cpu_seconds_median"] > 0
    assert results["cpu_ratio_before_over_light"] == pytest.approx(full["cpu_seconds_median"] / light["cpu_seconds_median"])


def test_scalar_path_bytes_add_up_and_latencies_are_measured(tmp_path: Path) -> None:
    out = tmp_path / "scalar_path.json"
    printed = run_bench("scalar_path", "--models", "mlp", "resnet18", "--calls", "20", "--warmup", "2",
                        "--out", str(out)).stdout
    rows = {row["model"]: row for row in json.loads(out.read_text())["results"]}
    assert {model: row["units"] for model, row in rows.items()} == {"mlp": 4, "resnet18": 62}
    for row in rows.values():
        assert row["total_bytes"] == row["header_message_bytes"] + row["scalar_message_bytes"]
        assert row["total_bytes"] == pytest.approx(row["fixed_bytes"] + row["units"] * row["per_unit_bytes"])
        assert row["information_bytes"] == 4 * row["units"]
        assert row["fixed_bytes"] > row["header_message_bytes"] > 16  # the token alone is 16 bytes
        assert row["per_unit_bytes"] > 4  # a rho plus its unit and version
        assert len(row["latency_seconds"]) == 20
        assert 0 < row["latency_median_ms"] <= row["latency_p90_ms"]
    assert "| resnet18 | 62 |" in printed


def test_scale_mirrors_hold_k_model_copies_and_float16_halves_them(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    printed = run_bench("scale", "--workers", "2", "4", "--rounds", "2", "--processes", "1",
                        "--work-dir", str(tmp_path / "runs"), "--out", str(out), timeout=400).stdout  # 8 federations
    result = json.loads(out.read_text())
    runs = {(row["workers"], row["wire_dtype"], row["allocator"]): row for row in result["results"]}
    settings = [(dtype, allocator) for dtype in ("float32", "float16") for allocator in ("pinned", "adaptive")]
    assert set(runs) == {(k, *pair) for k in (2, 4) for pair in settings}
    for (k, dtype, _), row in runs.items():
        assert row["model_bytes"] == row["model_parameters"] * {"float32": 4, "float16": 2}[dtype]
        assert row["mirror_bytes"] == row["k_model_bytes"] == k * row["model_bytes"] and row["mirrors_match"]
        assert row["peak_rss_bytes"] > row["mirror_bytes"] > 0
        assert len(row["round_seconds"]) == 2 and row["median_round_seconds"] > 0
    for k in (2, 4):
        for allocator in ("pinned", "adaptive"):
            assert 2 * runs[k, "float16", allocator]["mirror_bytes"] == runs[k, "float32", allocator]["mirror_bytes"]
    by_dtype, by_allocator = result["savings"]["wire_dtype"], result["savings"]["allocator"]
    assert sorted((s["workers"], s["allocator"], s["mirror_bytes_ratio"]) for s in by_dtype) == [
        (2, "adaptive", 0.5), (2, "pinned", 0.5), (4, "adaptive", 0.5), (4, "pinned", 0.5)]
    assert sorted((s["workers"], s["wire_dtype"], s["against"]) for s in by_allocator) == [
        (2, "float16", "float16, adaptive"), (2, "float32", "float32, adaptive"),
        (4, "float16", "float16, adaptive"), (4, "float32", "float32, adaptive")]
    assert set(result["growth"]) == {f"{dtype}, {allocator}" for dtype, allocator in settings}
    for grown in result["growth"].values():
        assert grown["mirror_bytes_per_worker"] == pytest.approx(grown["model_bytes"])
        assert grown["peak_rss_bytes_per_worker"] is not None and grown["median_round_seconds_per_worker"] is not None
    assert "| 4 | float16 | adaptive |" in printed and "Growth with K" in printed


def test_thousands_runs_memory_and_disk_mirrors_to_the_same_final_model(tmp_path: Path) -> None:
    out = tmp_path / "thousands.json"
    printed = run_bench("thousands", "--points", "4:own:memory", "4:shared:disk", "--rounds", "2", "--processes", "1",
                        "--work-dir", str(tmp_path / "runs"), "--out", str(out), timeout=300).stdout
    result = json.loads(out.read_text())
    rows = {(row["models"], row["mirrors"]): row for row in result["results"]}
    assert set(rows) == {("own", "memory"), ("shared", "disk")}
    for row in rows.values():
        assert row["workers"] == 4 and row["sampled_per_round"] == 1 and row["rounds"] == 2
        assert row["mirror_bytes"] == row["workers_with_mirrors"] * row["model_bytes"] > 0
        assert row["server_peak_pss_bytes"] > 0 and row["workers_peak_pss_bytes"] > 0 and row["pss_samples"] > 0
        assert row["same_final_model_at_k"]  # own or shared models, memory or disk mirrors: the same training
    assert set(result["growth"]) == {"own models, memory mirrors", "shared models, disk mirrors"}
    assert "| 4 | shared | disk |" in printed


def test_footprint_samples_every_process_and_compares_with_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "footprint.json"
    printed = run_bench("footprint", "--quick", "--work-dir", str(tmp_path / "runs"), "--out", str(out),
                        timeout=300).stdout
    result = json.loads(out.read_text())["results"]
    [default] = result["runs"]
    assert default["label"] == "default" and default["rounds"] == 2
    assert default["worker_processes"] == min(2, max(1, len(os.sched_getaffinity(0)) - 1))  # the default
    assert all(default["peak_pss_bytes_by_role"][role] > 0 for role in ("launcher", "check", "server", "workers"))
    assert default["peak_pss_bytes"] <= sum(default["peak_pss_bytes_by_role"].values())
    assert default["cpu_seconds_total"] > default["cpu_seconds_per_round"] > 0 and default["wall_seconds_per_round"] > 0
    assert result["floor"]["rounds"] == 2 and result["floor"]["cpu_seconds_per_round"] > 0
    assert result["floor"]["final_accuracy"] == default["final_accuracy"]  # the floor trains the same job
    assert [r["workers"] for r in result["scan"]["runs"]] == [1, 2]
    assert result["scan"]["runs"][1]["peak_pss_bytes"] == default["peak_pss_bytes"]  # the same run, not a rerun
    assert set(result["scan"]["slope_bytes_per_worker"]) == {"launcher", "check", "server", "workers", "total"}
    assert f"| `default` | {default['worker_processes']} |" in printed


def test_ingest_times_k_uploading_processes_against_the_floor_and_checks_the_byte_count(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    printed = run_bench("ingest", "--sizes", "100k", "--workers", "2", "--repeats", "2", "--out", str(out)).stdout
    rows = json.loads(out.read_text())["results"]
    assert [(row["floats"], row["workers"]) for row in rows] == [(100_000, 2)]
    for row in rows:
        assert row["payload_bytes"] == 400_000 * row["workers"]
        # bench.ingest itself refuses a run whose server counted other uplink bytes than were sent
        assert row["uplink_bytes_per_round"] > row["payload_bytes"]
        assert len(row["ingest_seconds"]) == len(row["floor_seconds"]) == 2
        assert row["ratio"] == pytest.approx(row["ingest_mb_per_s"] / row["floor_mb_per_s"])
        assert row["ingest_server_cpu_s_per_gb"] >= 0 and row["floor_server_cpu_s_per_gb"] >= 0
    assert "| 100,000 | 2 |" in printed


def test_overhead_and_profile_run_and_the_document_renders_every_section(tmp_path: Path) -> None:
    results = tmp_path / "results"
    run_bench("overhead", "--model", "mlp", "--workers", "2", "--rounds", "2", "--embedded",
              "--work-dir", str(tmp_path / "runs"), "--out", str(results / "overhead.json"))
    [overhead] = json.loads((results / "overhead.json").read_text())["results"]
    assert overhead["models_agree"], overhead  # the gRPC system and the simulation end with the same model
    assert len(overhead["system_round_seconds"]) == len(overhead["sim_round_seconds"]) == 2
    assert overhead["ratio"] == pytest.approx(overhead["system_median_seconds"] / overhead["sim_median_seconds"])

    run_bench("profile", "--workers", "2", "--repeats", "1", "--top", "5", "--out", str(results / "profile.json"))
    [profile] = json.loads((results / "profile.json").read_text())["results"]
    assert len(profile["top_functions"]) == 5 and all(step["seconds"] > 0 for step in profile["steps"])
    assert {(e["fix"], e["variant"].split(":")[0]) for e in profile["fixes"]} == {
        (fix, variant) for fix in ("uplink encoding", "NaN/Inf check", "upload parsing")
        for variant in ("before", "after")}

    document = tmp_path / "PERFORMANCE.md"
    run_bench("performance", "--render", "--results-dir", str(results), "--out", str(document))
    text = document.read_text()
    for title in ("1. Transport", "2. Scalar path", "3. System overhead", "4. Bandwidth", "5. Scale", "6. Profile"):
        assert f"## {title}" in text
    assert text.count("Not measured yet") == 7  # transport, scalar path, lab, scale, ingest, footprint, thousands: not run here
    assert "| mlp | 2 | mnist-embedded | 2 |" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="the network lab needs root")
def test_lab_compares_lbgm_with_delta0_under_a_capped_uplink(tmp_path: Path) -> None:
    out = tmp_path / "lab.json"
    printed = run_bench("lab", "--config", "configs/default.toml", "--hosts", "2", "--workers", "4", "--rounds", "2",
                        "--uplinks", "100mbit", "--target-accuracy", "0.1", "--work-dir", str(tmp_path / "runs"),
                        "--out", str(out)).stdout
    [row] = json.loads(out.read_text())["results"]
    assert (row["lbgm"]["delta"], row["baseline"]["delta"]) == (0.2, 0.0)
    for run in (row["lbgm"], row["baseline"]):
        assert run["rounds_completed"] == 2 and run["round_to_target"] == 1 and run["seconds_to_target"] > 0
    assert row["speedup"] == pytest.approx(row["baseline"]["seconds_to_target"] / row["lbgm"]["seconds_to_target"])
    assert row["uplink_bytes_ratio"] == pytest.approx(
        row["baseline"]["uplink_bytes_to_target"] / row["lbgm"]["uplink_bytes_to_target"])
    for run in (row["lbgm"], row["baseline"]):
        assert [accuracy for _, accuracy in run["accuracy_over_time"]][0] > 0 and len(run["round_seconds"]) == 2
    assert row["meets_target"] is None  # the 2x target is stated for 10 Mbit/s
    assert "| 100mbit |" in printed
    # The same run folders summarized again, without running: the same figures.
    again = tmp_path / "again.json"
    run_bench("lab", "--uplinks", "100mbit", "--target-accuracy", "0.1", "--work-dir", str(tmp_path / "runs"),
              "--reuse-runs", "--out", str(again))
    assert json.loads(again.read_text())["results"] == [row]


def test_downlink_decisions_explain_every_full_layer_and_agree_with_the_decisions(tmp_path: Path) -> None:
    printed = run_bench("downlink_decisions", "--rounds", "25", "--dtypes", "float32", "--out-dir",
                        str(tmp_path)).stdout
    result = json.loads((tmp_path / "decisions.json").read_text())
    assert (tmp_path / "decisions.png").stat().st_size > 0
    [(dtype, run)] = result["results"].items()
    records, summary = run["records"], run["summary"]
    assert dtype == "float32" and len(records) == 25 * 4  # the default job's MLP: 4 parameter tensors
    for record in records:
        if record["wanted_error"] is None:  # no look-back yet: always in full
            assert record["full"]
        else:  # the recorded test is the one the server decided by
            assert record["full"] == (record["wanted_error"] > 0.2)
    assert summary["scalar_layer_rounds"] == sum(not r["full"] for r in records) > 0
    assert sum(summary["full_by_cause"].values()) == pytest.approx(summary["floats_sent_in_full"])
    assert summary["full_by_cause"]["first"] > 0 and 0 < summary["floats_sent_in_full"] < 1
    assert "| float32 |" in printed
