"""A ScalarUpdate against an LBG version the server does not hold is refused
with FAILED_PRECONDITION + STALE_LBG, and the worker recovers by resending
those units in full. Real server process; the worker runs in this process so
the test can corrupt its LBG versions."""

from __future__ import annotations

import dataclasses
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.grpc_options import CHANNEL_OPTIONS, ERROR_DETAIL_KEY, PROTOCOL, worker_metadata
from lbgm.common.wire import ScalarEntry, read_task, submit_update_call, update_parts
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.client import VirtualWorker, error_detail

from conftest import FAST, join_request, start_server

# delta = 1 makes every unit with an LBG go as a scalar, so round 2 is all scalars.
CONFIG = ExperimentConfig(name="stale", workers=1, rounds=3, delta=1.0, **FAST)


@pytest.fixture
def server(tmp_path, processes):
    server = start_server(tmp_path, CONFIG)
    processes.append(server.process)
    return server


def next_task(stub, worker):
    request = pb.TaskRequest(worker_id=worker.worker_id, token=worker.token, max_wait_seconds=10)
    return read_task(stub.GetTask(request, timeout=30, metadata=worker_metadata(worker.worker_id, worker.token)),
                     1 << 30)


def test_stale_scalar_is_refused_and_worker_recovers(server):
    worker = VirtualWorker("solo", server.target)
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        submit = submit_update_call(channel)
        worker.join(stub)
        worker.run_round(submit, next_task(stub, worker))  # round 1: everything full, LBG version 1

        task = next_task(stub, worker)
        assert task.task.round == 2
        # A raw scalar upload naming a version the server never saw is refused with a precise status.
        header = pb.UpdateHeader(worker_id=worker.worker_id, token=worker.token, round=2, num_samples=10)
        stale = [ScalarEntry(unit, 1.0, 7) for unit in range(4)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitUpdate(update_parts(header, [], stale), timeout=10,
                              metadata=worker_metadata(worker.worker_id, worker.token))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        detail = error_detail(refused.value)
        assert detail.reason == pb.ErrorDetail.STALE_LBG and list(detail.stale_units) == [0, 1, 2, 3]
        assert "resend those units in full" in refused.value.details()

        # The worker's own LBG for unit 2 is corrupted to a wrong version: its scalar is refused,
        # it resends unit 2 in full, and the round is accepted.
        lbg = worker.encoder.lbgs[2]
        worker.encoder.lbgs[2] = dataclasses.replace(lbg, version=lbg.version + 5)
        worker.run_round(submit, task)
        assert worker.stats.stale_resends == 1 and worker.stats.refused_rounds == 0
        assert worker.encoder.lbgs[2].version == 2 and worker.encoder.lbgs[0].version == 1

        worker.run_round(submit, next_task(stub, worker))  # round 3: all scalars against matching versions
    assert server.process.wait(timeout=60) == 0
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["refused"] == {"STALE_LBG": 2}
    assert (records[1]["full_units"], records[1]["scalar_units"]) == (1, 3)
    assert (records[2]["full_units"], records[2]["scalar_units"]) == (0, 4)
    assert records[1]["uplink_by_kind"]["scalar"] > 0


def test_health_and_reflection_are_served(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lbgm.v1.Aggregator"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(replies).list_services_response.service}
        assert {"lbgm.v1.Aggregator", "grpc.health.v1.Health"} <= names


def test_wrong_token_and_unknown_worker_are_unauthenticated(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        reply = stub.Join(join_request(stub, "w"), timeout=10)
        for worker_id, token in ((reply.worker_id, b"not-the-token"), (99, reply.token)):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.GetTask(pb.TaskRequest(worker_id=worker_id, token=token), timeout=10,
                                  metadata=worker_metadata(worker_id, token)))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            keys = [key for key, _ in refused.value.trailing_metadata()]
            assert ERROR_DETAIL_KEY in keys


def test_protocol_mismatch_and_full_federation_are_refused(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(pb.JoinRequest(worker_name="old", protocol="lbgm.v0"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stub.Join(join_request(stub, "first"), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(join_request(stub, "second"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_message_over_the_size_limit_is_refused(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(pb.JoinRequest(worker_name="x" * (8 << 20), protocol=PROTOCOL), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
