"""Observability: the server's Prometheus endpoint agrees with its own accounting, and logs can be JSON lines."""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import subprocess
import time
import urllib.request
from collections import defaultdict

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbgm.cli.logs import JsonFormatter
from lbgm.cli.main import fetch_status
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.metrics import ServerMetrics
from lbgm.v1 import lbgm_pb2 as pb

from conftest import FAST, lbgm, start_server, start_worker

# Far more rounds than the test waits for: the server must still be running when it is scraped.
RUNNING = ExperimentConfig(name="metrics", workers=2, rounds=200, delta=0.5, **FAST)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse(text: str) -> Samples:
    """(sample name, sorted labels) -> value, for every sample of an exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def by_kind(records: list[dict], key: str) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for record in records:
        for kind, count in record[key].items():
            totals[kind] += count
    return totals


def wait_for_rounds(server, port: int, rounds: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"server exited:\n{server.log()}"
        try:
            if value(scrape(port), "lbgm_rounds_completed_total") >= rounds:
                return
        except OSError:
            pass  # a loaded machine may time a scrape out: try again
        time.sleep(0.5)
    pytest.fail(f"fewer than {rounds} rounds within {timeout:.0f}s:\n{server.log()}")


def test_metrics_endpoint_agrees_with_the_servers_accounting(tmp_path, processes):
    port = free_port()
    server = start_server(tmp_path, RUNNING, extra_args=["--metrics-port", str(port)])
    processes.append(server.process)
    processes.append(start_worker(tmp_path, server.target, "obs", virtual_workers=2))
    wait_for_rounds(server, port, 3)

    # Read in this order, every figure is a lower bound of the next: the counters only grow.
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    before = fetch_status(server.target)
    samples = scrape(port)
    after = fetch_status(server.target)

    completed = value(samples, "lbgm_rounds_completed_total")
    assert len(records) <= completed and before.completed_rounds <= completed <= after.completed_rounds
    assert completed <= value(samples, "lbgm_round_current") <= completed + 1
    assert value(samples, "lbgm_rounds_planned") == RUNNING.rounds
    assert value(samples, "lbgm_round_duration_seconds_count") >= len(records)
    assert value(samples, "lbgm_workers_registered") == 2
    assert value(samples, "lbgm_workers_connected") == 2
    assert 0.0 < value(samples, "lbgm_test_accuracy") <= 1.0
    assert not math.isnan(value(samples, "lbgm_test_loss"))

    uplink = {kind: value(samples, "lbgm_uplink_bytes_total", kind=kind)
              for kind in ("header", "full", "scalar", "buffer", "refused")}
    downlink = {kind: value(samples, "lbgm_downlink_bytes_total", kind=kind) for kind in ("task", "model", "control")}
    assert before.uplink_bytes <= sum(uplink.values()) <= after.uplink_bytes
    assert before.downlink_bytes <= sum(downlink.values()) <= after.downlink_bytes
    for kind, recorded in by_kind(records, "uplink_by_kind").items():
        assert uplink[kind] >= recorded, kind
    for kind, recorded in by_kind(records, "downlink_by_kind").items():
        assert downlink[kind] >= recorded, kind
    assert uplink["full"] > 0 and uplink["refused"] == 0
    for direction, key in (("up", "full_equivalent_uplink_bytes"), ("down", "full_equivalent_downlink_bytes")):
        recorded = sum(record[key] for record in records)
        assert value(samples, "lbgm_full_equivalent_bytes_total", direction=direction) >= recorded > 0

    scalar_units = value(samples, "lbgm_units_uploaded_total", kind="scalar")
    full_units = value(samples, "lbgm_units_uploaded_total", kind="full")
    assert scalar_units > 0  # delta 0.5: the MLP's gradients stay parallel after round 1
    assert scalar_units >= sum(r["scalar_units"] for r in records)
    assert full_units >= sum(r["full_units"] for r in records)
    assert value(samples, "lbgm_refused_uploads_total", reason="STALE_LBG") == 0
    assert value(samples, "lbgm_mirror_bytes") > 0
    assert value(samples, "lbgm_server_resident_memory_bytes") > 0


def test_servers_in_one_process_keep_separate_registries():
    status = pb.StatusReply(round=1, total_rounds=5, completed_rounds=1, workers_joined=3, test_accuracy=0.5)
    first, second = (ServerMetrics(lambda: status, lambda: 0, round_timeout=10.0) for _ in range(2))
    first.downlink("task", 100)
    assert value(parse(generate_latest(first.registry).decode()), "lbgm_downlink_bytes_total", kind="task") == 100
    assert value(parse(generate_latest(second.registry).decode()), "lbgm_downlink_bytes_total", kind="task") == 0
    assert value(parse(generate_latest(second.registry).decode()), "lbgm_workers_registered") == 3


def test_a_worker_counts_as_connected_until_a_window_without_calls_has_passed():
    now = [0.0]
    metrics = ServerMetrics(pb.StatusReply, lambda: 0, round_timeout=10.0, clock=lambda: now[0])
    metrics.heard_from(1)
    metrics.heard_from(2)
    now[0] = 50.0
    metrics.heard_from(2)
    now[0] = 1.0 + metrics.connected_window_seconds
    assert value(parse(generate_latest(metrics.registry).decode()), "lbgm_workers_connected") == 1


def test_json_formatter_writes_one_object_per_line_with_the_exception():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lbgm.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("two\nlines: %d", 2)
        try:
            raise ValueError("bad value")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    warning, error = (json.loads(line) for line in lines)
    assert warning["level"] == "WARNING" and warning["logger"] == "lbgm.test.json"
    assert warning["message"] == "two\nlines: 2" and warning["thread"] == "MainThread"
    assert warning["ts"].endswith("+00:00") and "exception" not in warning
    assert error["level"] == "ERROR" and "ValueError: bad value" in error["exception"]


def test_server_with_json_log_format_writes_only_json_lines(tmp_path, processes):
    server = start_server(tmp_path, ExperimentConfig(name="json-logs", workers=1, rounds=1, **FAST),
                          extra_args=["--log-format", "json"])
    processes.append(server.process)
    entries = [json.loads(line) for line in server.log().splitlines()]
    assert any(entry["message"].startswith("aggregator listening") for entry in entries)
    assert {"ts", "level", "logger", "thread", "message"} <= set(entries[0])


def test_metrics_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            lbgm("server", "--port", "0", "--metrics-port", str(port), "--workers", "1", "--model", "mlp",
                 "--out-dir", str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
