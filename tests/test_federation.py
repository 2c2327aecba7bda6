"""A whole federation over localhost gRPC: one server process, two worker
processes hosting two virtual workers each."""

from __future__ import annotations

import json

import pytest
import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.state_files import load
from lbgm.sim.federation import simulate

from conftest import assert_mirrors_equal_worker_lbgs, FAST, start_server, start_worker

CONFIG = ExperimentConfig(name="integration", workers=4, rounds=8, delta=0.5, **FAST)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("federation")
    server = start_server(tmp_path, CONFIG)
    workers = [start_worker(tmp_path, server.target, f"host{i}", virtual_workers=2, state_dir=tmp_path / "state")
               for i in range(2)]
    try:
        assert server.process.wait(timeout=300) == 0, server.log()
        for worker in workers:
            assert worker.wait(timeout=60) == 0
    finally:
        for process in (server.process, *workers):
            if process.poll() is None:
                process.kill()
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    return server, records, tmp_path / "state"


def test_every_round_completes_with_all_workers(finished_run):
    server, records, _ = finished_run
    summary_lines = (server.run_dir / "partition.txt").read_text().splitlines()
    assert len(summary_lines) == 1 + CONFIG.workers + 1  # header, one line per worker, footer
    assert [r["round"] for r in records] == list(range(1, CONFIG.rounds + 1))
    assert all(r["participants"] == [1, 2, 3, 4] and not r["missing"] for r in records)


def test_scalar_updates_happened_and_saved_uplink_bytes(finished_run):
    server, records, _ = finished_run
    assert sum(r["scalar_units"] for r in records) > 0
    summary = json.loads((server.run_dir / "summary.json").read_text())
    assert summary["uplink_bytes"] < summary["full_equivalent_uplink_bytes"]
    assert summary["floats_uploaded"] < summary["full_equivalent_floats"]


def test_accuracy_rose(finished_run):
    _, records, _ = finished_run
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"] + 0.05
    assert records[-1]["test_accuracy"] > 0.6


def test_byte_counts_add_up_per_kind_and_per_worker(finished_run):
    _, records, _ = finished_run
    for record in records:
        assert sum(record["uplink_by_kind"].values()) == record["uplink_bytes"]
        assert sum(sum(kinds.values()) for kinds in record["uplink_by_worker"].values()) == record["uplink_bytes"]
        assert sum(record["downlink_by_kind"].values()) == record["downlink_bytes"] > 0
        scalar_only = record["full_units"] == 0
        assert (record["uplink_by_kind"].get("full", 0) == 0) == scalar_only


def test_server_mirrors_equal_worker_lbgs_bit_for_bit(finished_run):
    server, _, state_dir = finished_run
    assert_mirrors_equal_worker_lbgs(server.run_dir, state_dir, ["host0-0", "host0-1", "host1-0", "host1-1"], 4)


def test_distributed_model_matches_in_process_simulation(finished_run):
    server, records, _ = finished_run
    reference = simulate(CONFIG)
    final = load(server.run_dir / "final_model.pt")
    for distributed, simulated in zip(final["params"], reference.params, strict=True):
        assert torch.allclose(distributed, simulated, atol=1e-6)
    assert [r["scalar_units"] for r in records] == [r["scalar_units"] for r in reference.rounds]
