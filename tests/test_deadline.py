"""A sampled worker that never uploads cannot stall training: each round
closes at its deadline with the updates that arrived."""

from __future__ import annotations

import json
import time

import grpc

from lbgm.experiment.config import ExperimentConfig
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

from conftest import FAST, join_request, start_server, start_worker

DEADLINE = 3.0
CONFIG = ExperimentConfig(name="deadline", workers=2, rounds=3, delta=0.5, **{**FAST, "round_timeout": DEADLINE})


def test_silent_worker_is_left_out_at_the_deadline(tmp_path, processes):
    server = start_server(tmp_path, CONFIG)
    processes.append(server.process)
    with grpc.insecure_channel(server.target) as channel:
        # Joins (so it is sampled every round) and then never asks for work.
        stub = pb_grpc.AggregatorStub(channel)
        silent = stub.Join(join_request(stub, "silent"), timeout=10)
        processes.append(start_worker(tmp_path, server.target, "diligent"))
        started = time.monotonic()
        assert server.process.wait(timeout=120) == 0, server.log()
        elapsed = time.monotonic() - started
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == CONFIG.rounds
    for record in records:
        assert record["missing"] == [silent.worker_id]
        assert len(record["participants"]) == 1
        assert DEADLINE - 0.5 < record["round_seconds"] < DEADLINE + 5
    assert elapsed < CONFIG.rounds * (DEADLINE + 5) + 30
