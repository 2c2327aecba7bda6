"""A hostile client cannot hold the server's threads, forge its log, read its state digest
or take a worker's slot (issue 13, items 3 and 5-8).

Refusals are probed with raw gRPC calls; the stalled-stream scenario runs a real
server process and real worker processes next to the attacker.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.lookback import LookbackGradient
from lbgm.tasks.models import build_model
from lbgm.common.grpc_options import (
    CHANNEL_OPTIONS, JOIN_TOKEN_KEY, OPERATOR_TOKEN_KEY, WORKER_ID_KEY, worker_metadata,
)
from lbgm.server.app import Access, start_server as start_in_process
from lbgm.server.limits import CallLimits
from lbgm.server.mirrors import MirrorStore
from lbgm.server.rounds import Coordinator
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.client import error_detail

from conftest import FAST, join_request, lbgm, start_server, start_worker

JOIN_TOKEN = "join-token-for-the-hostile-transport-tests"
OPERATOR_TOKEN = "operator-token-for-the-hostile-transport-tests"
SERVICE = "/lbgm.v1.Aggregator"


def join(stub: pb_grpc.AggregatorStub, name: str, token: str | None = JOIN_TOKEN) -> pb.JoinReply:
    metadata = ((JOIN_TOKEN_KEY, token.encode()),) if token is not None else None
    return stub.Join(join_request(stub, name, metadata), timeout=10, metadata=metadata)


def poll(stub: pb_grpc.AggregatorStub, reply: pb.JoinReply, wait: float, timeout: float = 10.0) -> list[pb.TaskPart]:
    request = pb.TaskRequest(worker_id=reply.worker_id, token=reply.token, max_wait_seconds=wait)
    return list(stub.GetTask(request, timeout=timeout, metadata=worker_metadata(reply.worker_id, reply.token)))


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


class Staller:
    """Calls that open and then send nothing until `release()`."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.event = threading.Event()
        self.calls: list[grpc.Future] = []

    def _silence(self) -> Iterator[bytes]:
        self.event.wait(120)
        yield from ()

    def open(self, method: str, count: int, metadata: tuple = ()) -> None:
        call = self.channel.stream_unary(f"{SERVICE}/{method}", request_serializer=bytes,
                                         response_deserializer=bytes)
        self.calls += [call.future(self._silence(), timeout=120, metadata=metadata or None) for _ in range(count)]

    def release(self) -> None:
        self.event.set()
        for call in self.calls:
            call.cancel()


# ------------------------------------------------------------------ a server in this process


@pytest.fixture
def in_process(tmp_path) -> Iterator[tuple[Coordinator, grpc.Channel]]:
    """A server without its round driver: no round ever opens, so every long poll waits its full window."""
    config = ExperimentConfig(name="inproc", workers=2, rounds=1, **FAST)
    coordinator = Coordinator(config, tmp_path / "run")
    running = start_in_process(coordinator, "127.0.0.1", 0, Access(join_token=JOIN_TOKEN.encode(),
                                                                   limits=CallLimits(stall_seconds=2.0)))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=CHANNEL_OPTIONS)
    try:
        yield coordinator, channel
    finally:
        channel.close()
        running.stop(grace=0)


def threads_in(function_name: str) -> int:
    """Threads of this process whose stack is inside `function_name` now."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == function_name:
                count += 1
                break
            frame = frame.f_back
    return count


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("wait", [math.nan, math.inf, -math.inf, -1.0])
def test_a_poll_window_that_is_not_a_finite_number_of_seconds_is_refused_at_once(in_process, wait):
    _, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    reply = join(stub, "poller")
    started = time.monotonic()
    error = refusal(lambda: poll(stub, reply, wait))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_wait_seconds must be a finite number >= 0, got {wait!r}" in error.details()
    assert time.monotonic() - started < 1.0


def test_a_long_poll_stops_waiting_when_its_client_hangs_up(in_process):
    _, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    reply = join(stub, "poller")
    request = pb.TaskRequest(worker_id=reply.worker_id, token=reply.token, max_wait_seconds=30)
    call = stub.GetTask(request, timeout=60, metadata=worker_metadata(reply.worker_id, reply.token))
    assert wait_until(lambda: threads_in("wait_for_task") == 1, 5.0), "the poll never started waiting"
    call.cancel()
    # Before the fix the thread waited out its 30 s window after the client had gone.
    assert wait_until(lambda: threads_in("wait_for_task") == 0, 2.0), "the server still waits for a gone client"


def test_a_newer_poll_of_the_same_worker_cancels_the_older(in_process):
    _, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    reply = join(stub, "poller")
    request = pb.TaskRequest(worker_id=reply.worker_id, token=reply.token, max_wait_seconds=30)
    metadata = worker_metadata(reply.worker_id, reply.token)
    calls = [stub.GetTask(request, timeout=60, metadata=metadata) for _ in range(5)]
    assert wait_until(lambda: sum(call.done() for call in calls) == 4, 5.0)
    assert threads_in("wait_for_task") == 1
    assert sorted(call.code().name for call in calls if call.done()) == ["CANCELLED"] * 4
    for call in calls:
        call.cancel()


def test_a_stream_that_stops_sending_is_cancelled_after_the_stall_timeout(in_process):
    coordinator, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    reply = join(stub, "staller")
    release = threading.Event()

    def header_then_silence() -> Iterator[pb.UpdatePart]:
        yield pb.UpdatePart(header=pb.UpdateHeader(worker_id=reply.worker_id, token=reply.token, round=1))
        release.wait(30)

    started = time.monotonic()
    error = refusal(lambda: stub.SubmitUpdate(header_then_silence(), timeout=30,
                                              metadata=worker_metadata(reply.worker_id, reply.token)))
    release.set()
    assert error.code() == grpc.StatusCode.CANCELLED
    assert 2.0 <= time.monotonic() - started < 5.0  # --stall-timeout 2 in this fixture


def test_stalled_status_calls_fill_only_their_own_pool_and_only_until_the_stall_timeout(in_process):
    _, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    reply = join(stub, "worker")
    staller = Staller(channel)
    try:
        staller.open("GetStatus", CallLimits.control_calls)  # unary requests whose message never comes
        assert wait_until(lambda: threads_in("_received") == CallLimits.control_calls, 5.0)
        started = time.monotonic()
        error = refusal(lambda: stub.GetStatus(pb.StatusRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 1.0
        assert poll(stub, reply, 0)[0].WhichOneof("part") == "idle"  # a worker's call still runs
        assert wait_until(lambda: all(call.done() for call in staller.calls), 4.0)  # stall timeout 2 s
        assert {call.code() for call in staller.calls} == {grpc.StatusCode.CANCELLED}
        assert stub.GetStatus(pb.StatusRequest(), timeout=5).total_rounds == 1
    finally:
        staller.release()


# ------------------------------------------------------------------ credentials before any message


def test_an_upload_without_credentials_in_its_metadata_is_refused_before_it_is_read(in_process):
    _, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    reply = join(stub, "uploader")
    never = threading.Event()

    def silence() -> Iterator[pb.UpdatePart]:
        never.wait(30)
        yield from ()

    started = time.monotonic()
    error = refusal(lambda: stub.SubmitUpdate(silence(), timeout=30))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "needs the call metadata lbgm-worker-id" in error.details()
    assert error_detail(error).reason == pb.ErrorDetail.UNAUTHENTICATED
    error = refusal(lambda: stub.SubmitUpdate(silence(), timeout=30, metadata=worker_metadata(reply.worker_id, b"x")))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, f"bad token for worker {reply.worker_id}")
    never.set()
    assert time.monotonic() - started < 2.0  # neither refusal waited for a message


def test_an_upload_whose_header_names_another_worker_than_its_metadata_is_refused(in_process):
    _, channel = in_process
    stub = pb_grpc.AggregatorStub(channel)
    alice, bob = join(stub, "alice"), join(stub, "bob")
    header = pb.UpdatePart(header=pb.UpdateHeader(worker_id=bob.worker_id, token=bob.token, round=1))
    error = refusal(lambda: stub.SubmitUpdate(iter([header]), timeout=10,
                                              metadata=worker_metadata(alice.worker_id, alice.token)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"which proves worker {alice.worker_id}" in error.details()


# ------------------------------------------------------------------ worker names


@pytest.mark.parametrize("name", ["evil\nINFO forged line", "nul\0byte", "esc\x1b[2Jape", "", "x" * 129, "a b",
                                  "quote'd"])
def test_a_worker_name_outside_the_safe_set_is_refused(in_process, name):
    coordinator, channel = in_process
    error = refusal(lambda: join(pb_grpc.AggregatorStub(channel), name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not 1-128 characters from A-Z a-z 0-9 . _ : @ / -" in error.details()
    assert len(coordinator.registry) == 0


@pytest.mark.parametrize("name", ["hostA-0", "proc3-12", "site/7", "worker@host.example:1", "a_b.c"])
def test_names_that_lbgm_itself_makes_are_accepted(in_process, name):
    _, channel = in_process
    assert join(pb_grpc.AggregatorStub(channel), name).worker_id == 1


# ------------------------------------------------------------------ a server process


FEDERATION = ExperimentConfig(name="hostile-transport", workers=4, rounds=2, **{**FAST, "round_timeout": 6.0})


@pytest.fixture
def guarded_server(tmp_path, processes):
    (tmp_path / "join-token").write_text(JOIN_TOKEN + "\n")
    (tmp_path / "operator-token").write_text(OPERATOR_TOKEN + "\n")
    server = start_server(tmp_path, FEDERATION, ["--join-token-file", str(tmp_path / "join-token"),
                                                 "--operator-token-file", str(tmp_path / "operator-token"),
                                                 "--stall-timeout", "3"])
    processes.append(server.process)
    return server


def digest_call(stub: pb_grpc.AggregatorStub, token: bytes | None) -> pb.StatusReply:
    metadata = ((OPERATOR_TOKEN_KEY, token),) if token is not None else None
    return stub.GetStatus(pb.StatusRequest(include_state_digest=True), timeout=10, metadata=metadata)


def timed_status(stub: pb_grpc.AggregatorStub, latencies: list[float]) -> pb.StatusReply:
    started = time.monotonic()
    status = stub.GetStatus(pb.StatusRequest(), timeout=5)
    latencies.append(time.monotonic() - started)
    return status


def test_stalled_streams_neither_stop_the_rounds_nor_lbgm_status(guarded_server, tmp_path, processes):
    server = guarded_server
    channel = grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS)
    stub = pb_grpc.AggregatorStub(channel)
    attackers = [join(stub, f"staller-{index}") for index in range(2)]  # two of the four slots
    staller = Staller(channel)
    latencies: list[float] = []
    try:
        staller.open("SubmitUpdate", 24)  # no credentials
        staller.open("SubmitUpdate", 24, ((WORKER_ID_KEY, "1"),))  # no token
        staller.open("GetTask", 24)
        for who in attackers:  # authenticated: only the newest of each kind lives, and only until the stall timeout
            staller.open("SubmitUpdate", 12, worker_metadata(who.worker_id, who.token))
            staller.open("GetTask", 12, worker_metadata(who.worker_id, who.token))
        honest = start_worker(tmp_path, server.target, "honest", virtual_workers=2,
                              extra_args=["--join-token-file", str(tmp_path / "join-token")])
        processes.append(honest)
        deadline = time.monotonic() + 120
        while not timed_status(stub, latencies).finished:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        for who in attackers:  # hear that training finished, so the server need not wait for us
            assert poll(stub, who, 0)[0].WhichOneof("part") == "finished"
    finally:
        staller.release()
        channel.close()
    assert server.process.wait() == 0, server.log()
    assert honest.wait(timeout=30) == 0, (tmp_path / "honest.log").read_text()
    print(f"{len(latencies)} GetStatus calls during the attack, slowest {max(latencies) * 1e3:.0f} ms")
    assert max(latencies) < 1.0, f"slowest GetStatus {max(latencies):.2f}s"
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in records] == [[3, 4], [3, 4]]  # the honest workers, every round
    assert records[0]["refused"].get("UNAUTHENTICATED", 0) >= 72  # every refused call is counted
    assert "no next request message within 3s" in server.log()


def test_the_state_digest_needs_the_operator_token(guarded_server):
    with grpc.insecure_channel(guarded_server.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        for token in (None, b"a-wrong-operator-token"):
            error = refusal(lambda: digest_call(stub, token))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "needs the operator token in the lbgm-operator-token-bin call metadata" in error.details()
        assert len(digest_call(stub, OPERATOR_TOKEN.encode()).state_digest) == 64
        assert stub.GetStatus(pb.StatusRequest(), timeout=10).state_digest == ""  # status itself stays open
    shown = subprocess.run(lbgm("status", "--server", guarded_server.target, "--digest", "--json",
                                "--operator-token", OPERATOR_TOKEN), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert len(json.loads(shown.stdout)["state_digest"]) == 64


def test_without_an_operator_token_the_digest_is_off(in_process):
    _, channel = in_process
    error = refusal(lambda: digest_call(pb_grpc.AggregatorStub(channel), OPERATOR_TOKEN.encode()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "started without an operator token" in error.details()


def test_a_join_without_the_join_token_takes_no_slot_and_workers_with_it_finish(guarded_server, tmp_path, processes):
    server = guarded_server
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        for token in (None, "a-wrong-join-token-of-length"):
            error = refusal(lambda: join(stub, "honest-0", token))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "join token in the lbgm-join-token-bin call metadata" in error.details()
        assert stub.GetStatus(pb.StatusRequest(), timeout=10).workers_joined == 0
        stale = pb.JoinReply(worker_id=1, token=b"\0" * 16)
        assert refusal(lambda: poll(stub, stale, 0)).code() == grpc.StatusCode.UNAUTHENTICATED
    honest = start_worker(tmp_path, server.target, "honest", virtual_workers=4,
                          extra_args=["--join-token-file", str(tmp_path / "join-token")])
    processes.append(honest)
    assert server.process.wait(timeout=120) == 0, server.log()
    assert honest.wait(timeout=30) == 0, (tmp_path / "honest.log").read_text()
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in records] == [[1, 2, 3, 4]] * FEDERATION.rounds
    assert records[0]["refused"] == {"UNAUTHENTICATED": 3}  # two joins and the stale poll


def test_a_forged_name_leaves_no_forged_line_in_the_log(guarded_server):
    with grpc.insecure_channel(guarded_server.target, options=CHANNEL_OPTIONS) as channel:
        error = refusal(lambda: join(pb_grpc.AggregatorStub(channel), "evil\nINFO lbgm.server.rounds: forged"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.5)
    assert not [line for line in guarded_server.log().splitlines() if line.startswith("INFO lbgm.server.rounds: forged")]


# ------------------------------------------------------------------ the state digest's cost


def cnn_mirrors(workers: int, seed: int = 0) -> dict[int, dict[int, LookbackGradient]]:
    """One LBG per layer of the MNIST CNN (431,080 parameters) for each worker."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [tuple(p.shape) for p in build_model("cnn", 0).parameters()]
    return {worker: {unit: LookbackGradient((torch.randn(shape, generator=generator),), version=1)
                     for unit, shape in enumerate(shapes)} for worker in range(1, workers + 1)}


def fresh_digest(entries: dict[int, dict[int, LookbackGradient]]) -> bytes:
    store = MirrorStore()
    for worker, lbgs in entries.items():
        store.replace(worker, lbgs)
    return store.digest()


def test_the_mirror_digest_follows_every_change_and_equals_a_recomputation():
    entries = cnn_mirrors(3)
    store = MirrorStore()
    for worker, lbgs in entries.items():
        store.replace(worker, lbgs)
    first = store.digest()
    assert store.digest() == first == fresh_digest(entries)
    changed = entries[2][1].tensors[0].clone()
    changed.view(-1)[7] += 1.0
    store.replace(2, {1: LookbackGradient((changed,), version=1)})  # same version, one value differs
    assert store.digest() != first
    assert store.digest() == fresh_digest({**entries, 2: {**entries[2], 1: LookbackGradient((changed,), 1)}})
    store.replace(2, {1: entries[2][1]})
    assert store.digest() == first


def test_asking_for_the_digest_again_does_not_hash_the_mirrors_again():
    store = MirrorStore()
    for worker, lbgs in cnn_mirrors(100).items():  # 100 workers x 8 layers: 172 MB of mirrors
        store.replace(worker, lbgs)
    started = time.perf_counter()
    store.digest()  # hashes every entry once, as the digest did on every call before
    first = time.perf_counter() - started
    started = time.perf_counter()
    store.digest()
    again = time.perf_counter() - started
    print(f"digest of 100 CNN mirrors: first {first * 1e3:.0f} ms, again {again * 1e3:.2f} ms")
    assert again < first / 20
