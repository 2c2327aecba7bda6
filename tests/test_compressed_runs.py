"""Runs with a base compressor over real gRPC end like the in-process simulation.

Two findings of the audit in issue 13 are about the settings a compressor travels
with: low rank on a float16 or bfloat16 wire sent its uncompressed vector layers in
float32 while the server expected the wire dtype (every upload refused), and
`topk_fraction` travelled as a float32 so gRPC workers kept one value more per layer
than the simulation whenever fraction x size was a whole number.
"""

from __future__ import annotations

import json

import pytest
import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.state_files import load
from lbgm.sim.federation import simulate

from conftest import FAST, start_server, start_worker

# topk_fraction 0.1 x 156,800 (the MLP's first layer) is a whole number: a float32 fraction keeps 15,681.
CASES = {
    "lowrank on a float16 wire": dict(compressor="lowrank", wire_dtype="float16"),
    "lowrank on a bfloat16 wire": dict(compressor="lowrank", wire_dtype="bfloat16"),
    "topk keeps exactly a tenth": dict(compressor="topk", topk_fraction=0.1),
}


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_compressed_run_has_no_refusals_and_matches_the_simulation(tmp_path, settings):
    config = ExperimentConfig(name="compressed", workers=2, rounds=3, delta=0.5,
                              **{**FAST, "round_timeout": 20.0}, **settings)
    server = start_server(tmp_path, config)
    worker = start_worker(tmp_path, server.target, "host", virtual_workers=2)
    try:
        assert server.process.wait(timeout=120) == 0, server.log()
        assert worker.wait(timeout=60) == 0, (tmp_path / "host.log").read_text()
    finally:
        for process in (server.process, worker):
            if process.poll() is None:
                process.kill()
                process.wait()
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["refused"] for r in records] == [{}] * config.rounds
    assert [r["participants"] for r in records] == [[1, 2]] * config.rounds
    # The workers train with one intra-op thread (lbgm worker --torch-threads 1): so does the simulation, or
    # a matmul's summation order differs and a float16 wire can round a payload value the other way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = simulate(config)
    finally:
        torch.set_num_threads(threads)
    assert [r["floats_uploaded"] for r in records] == [r["floats_uploaded"] for r in reference.rounds]
    final = load(server.run_dir / "final_model.pt")
    for distributed, simulated in zip(final["params"], reference.params, strict=True):
        assert torch.allclose(distributed, simulated, atol=1e-6)
