"""The server checks a joining worker's model: a worker whose model differs from the server's weights
(names, shapes or dtypes) is refused at join with every difference named, and nothing changes on the
server (no slot taken, no registry or model change)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from lbgm.cli.main import main
from lbgm.experiment.config import ExperimentConfig
from lbgm.common.grpc_options import JOIN_TOKEN_KEY, OPERATOR_TOKEN_KEY, PROTOCOL, worker_metadata
from lbgm.common.model_spec import specs_from_proto, specs_to_proto
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.client import error_detail

from conftest import start_server, start_worker
from test_weights_server import write_eval_task

JOIN_TOKEN, OPERATOR_TOKEN = "join-token-of-the-join-check", "operator-token-of-the-join-check"
JOIN = ((JOIN_TOKEN_KEY, JOIN_TOKEN.encode()),)


@pytest.fixture
def weights_server(tmp_path, processes):
    """A server from a weights file (4 slots, round 1 never opens: it waits for all four workers)."""
    task = write_eval_task(tmp_path / "user", hidden=16)
    weights = tmp_path / "init.safetensors"
    assert main(["init-weights", "--task", task, "--out", str(weights)]) == 0
    server = start_server(tmp_path, ExperimentConfig(name="join-check", weights=str(weights), workers=4, rounds=1),
                          extra_args=("--join-token", JOIN_TOKEN, "--operator-token", OPERATOR_TOKEN))
    processes.append(server.process)
    with grpc.insecure_channel(server.target) as channel:
        yield server, pb_grpc.AggregatorStub(channel), tmp_path


def state(stub: pb_grpc.AggregatorStub) -> tuple[int, str]:
    status = stub.GetStatus(pb.StatusRequest(include_state_digest=True), timeout=10,
                            metadata=((OPERATOR_TOKEN_KEY, OPERATOR_TOKEN.encode()),))
    return status.workers_joined, status.state_digest


def test_a_join_whose_model_differs_is_refused_naming_every_difference_and_changes_nothing(weights_server):
    _, stub, _ = weights_server
    spec = stub.GetExperiment(pb.ExperimentRequest(worker_name="probe", protocol=PROTOCOL), timeout=10, metadata=JOIN)
    assert spec.task == ""  # the server runs from weights, not from a task
    expected = specs_from_proto(spec.model_tensors)
    renamed, reshaped, retyped = (dataclasses.replace(expected[0], name="encoder.weight"),
                                  dataclasses.replace(expected[1], shape=(32,)),
                                  dataclasses.replace(expected[6], dtype="int32"))
    cases = {
        "names": ([renamed, *expected[1:]], ["tensor 0: expected parameter 0.weight float32[16, 8], "
                                             "got parameter encoder.weight float32[16, 8]"]),
        "shapes and dtypes": ([expected[0], reshaped, *expected[2:6], retyped, *expected[7:]],
                              ["tensor 1: expected parameter 0.bias float32[16], got parameter 0.bias float32[32]",
                               "tensor 6: expected buffer 1.running_mean float32[16], "
                               "got buffer 1.running_mean int32[16]"]),
        "a tensor missing": (expected[:-1], ["expected 9 tensors, got 8"]),
        "no description": ([], ["expected 9 tensors, got 0"]),
    }
    before = state(stub)
    assert before[0] == 0
    for what, (tensors, differences) in cases.items():
        request = pb.JoinRequest(worker_name="w", protocol=PROTOCOL, model_tensors=specs_to_proto(tensors))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(request, timeout=10, metadata=JOIN)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, what
        assert error_detail(refused.value).reason == pb.ErrorDetail.MODEL_MISMATCH, what
        details = refused.value.details()
        assert details.startswith(f"worker w's model differs from the server's (weights file "), what
        assert details.endswith("; ".join(differences)), (what, details)
        assert state(stub) == before, what  # no slot taken, nothing else changed
    # the very same worker with the server's model joins, and takes a slot
    reply = stub.Join(pb.JoinRequest(worker_name="w", protocol=PROTOCOL, model_tensors=spec.model_tensors),
                      timeout=10, metadata=JOIN)
    assert reply.worker_id == 1 and state(stub)[0] == 1


def test_the_experiment_needs_the_join_token_as_a_join_does(weights_server):
    _, stub, _ = weights_server
    for metadata in (None, ((JOIN_TOKEN_KEY, b"a-wrong-token"),)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetExperiment(pb.ExperimentRequest(worker_name="w", protocol=PROTOCOL), timeout=10,
                               metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "join token" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetExperiment(pb.ExperimentRequest(worker_name="w", protocol="lbgm.v1"), timeout=10, metadata=JOIN)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert state(stub)[0] == 0


def test_a_worker_process_whose_task_builds_another_model_is_refused_at_join(weights_server, processes):
    server, stub, tmp_path = weights_server
    before = state(stub)
    worker = start_worker(tmp_path, server.target, "wide", extra_args=(
        "--task", write_eval_task(tmp_path / "other", hidden=32), "--join-token", JOIN_TOKEN))
    processes.append(worker)
    assert worker.wait(timeout=60) == 1
    log = (tmp_path / "wide.log").read_text()
    named = [line for line in log.splitlines() if "model differs from the server's" in line]
    assert len(named) == 1, log
    for index, kind, name, shape, wide in ((0, "parameter", "0.weight", "16, 8", "32, 8"),
                                           (1, "parameter", "0.bias", "16", "32"),
                                           (4, "parameter", "3.weight", "3, 16", "3, 32"),
                                           (7, "buffer", "1.running_var", "16", "32")):
        assert f"tensor {index}: expected {kind} {name} float32[{shape}], got {kind} {name} float32[{wide}]" in named[0]
    assert "tensor 5:" not in named[0] and "tensor 8:" not in named[0]  # the output bias and the counter match
    assert state(stub) == before
    assert "refused a join: worker wide's model differs" in server.log()


def test_an_evaluation_report_for_a_round_that_is_not_open_is_refused_and_changes_nothing(weights_server):
    _, stub, _ = weights_server
    spec = stub.GetExperiment(pb.ExperimentRequest(worker_name="w", protocol=PROTOCOL), timeout=10, metadata=JOIN)
    reply = stub.Join(pb.JoinRequest(worker_name="w", protocol=PROTOCOL, model_tensors=spec.model_tensors),
                      timeout=10, metadata=JOIN)
    before = state(stub)
    report = pb.EvaluationReport(worker_id=reply.worker_id, token=reply.token, round=1, num_samples=10, loss=0.5)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitEvaluation(report, timeout=10, metadata=worker_metadata(reply.worker_id, reply.token))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_detail(refused.value).reason == pb.ErrorDetail.ROUND_CLOSED
    assert state(stub) == before
    with pytest.raises(grpc.RpcError) as refused:  # another worker's token
        stub.SubmitEvaluation(report, timeout=10, metadata=worker_metadata(reply.worker_id, b"x" * 16))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
