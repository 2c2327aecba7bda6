"""A round's last upload is accepted, the round closes, and the acknowledgement
is lost. The worker's retry is answered DUPLICATE (not ROUND_CLOSED), so the
worker commits what the server aggregated and its error-feedback memory stays
in step. Real server process; the worker runs in this process so the test can
drop the acknowledgement and then read the worker's memory."""

from __future__ import annotations

import grpc

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.state_files import content_digest, lbgs_from_state, load
from lbgm.sim.federation import simulate
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker import client
from lbgm.worker.client import RetryPolicy, VirtualWorker, error_detail

from conftest import FAST, start_server

# One worker: its upload is the round's last, so the round closes the moment it is accepted.
CONFIG = ExperimentConfig(name="lost-ack", workers=1, rounds=4, delta=0.8, error_feedback=True, **FAST)
LOST_ACK_ROUND = 2


class ConnectionDropped(grpc.RpcError):
    """The connection broke after the server accepted the upload, before its acknowledgement arrived."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection dropped before the acknowledgement arrived"


def test_a_retry_after_a_lost_ack_is_a_duplicate_and_the_worker_stays_in_step(tmp_path, processes, monkeypatch):
    server = start_server(tmp_path, CONFIG)
    processes.append(server.process)
    retry_answers: list[int] = []
    real_submit_call = client.submit_update_call

    def submit_call_losing_one_ack(channel: grpc.Channel):
        submit = real_submit_call(channel)
        calls = 0

        def call(parts, **kwargs):
            nonlocal calls
            calls += 1
            if calls == LOST_ACK_ROUND:  # one upload per round so far
                submit(parts, **kwargs)
                raise ConnectionDropped()
            if calls == LOST_ACK_ROUND + 1:  # the worker's retry of that upload
                try:
                    return submit(parts, **kwargs)
                except grpc.RpcError as error:
                    retry_answers.append(error_detail(error).reason)
                    raise
            return submit(parts, **kwargs)
        return call

    monkeypatch.setattr(client, "submit_update_call", submit_call_losing_one_ack)
    worker = VirtualWorker("solo", server.target, poll_seconds=5, retry=RetryPolicy(initial_seconds=0.05))
    stats = worker.run()
    assert server.process.wait(timeout=60) == 0, server.log()

    assert [pb.ErrorDetail.Reason.Name(r) for r in retry_answers] == ["DUPLICATE"]
    assert (stats.rounds, stats.refused_rounds) == (CONFIG.rounds, 0)
    mirror = lbgs_from_state(load(server.run_dir / "mirrors.pt")["solo"])
    assert {u: (m.version, content_digest(m.tensors)) for u, m in mirror.items()} == \
           {u: (m.version, content_digest(m.tensors)) for u, m in worker.encoder.lbgs.items()}
    # The memory is what a worker whose acknowledgement arrived holds (the simulation's).
    uninterrupted = simulate(CONFIG, evaluate_every_round=False).workers[1].encoder
    assert sorted(worker.encoder.memory) == sorted(uninterrupted.memory) != []
    for layer, memory in uninterrupted.memory.items():
        assert (worker.encoder.memory[layer] - memory).abs().max() < 1e-6
