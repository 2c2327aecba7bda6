"""The benchmark scripts run end to end at tiny sizes and report consistent numbers
(what they measure is not checked here: timings belong to bench/, not to tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)


def test_transport_reports_positive_throughput_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    printed = run_bench("transport", "--sizes", "100k", "--repeats", "1", "--out", str(out)).stdout
    [row] = json.loads(out.read_text())["results"]
    assert row["floats"] == 100_000 and row["payload_bytes"] == 400_000
    assert row["raw_mb_per_s"] > 0 and row["grpc_mb_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["grpc_mb_per_s"] / row["raw_mb_per_s"])
    assert row["meets_target"] is None  # the target is stated for 10M values and more
    assert "| 100,000 |" in printed


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
