"""A hostile client cannot change the server's state.

The client is written against the .proto alone: its stubs are compiled from
proto/lbgm/v1/lbgm.proto at test time and its tensors are built with numpy, so
nothing of lbgm's own wire code helps it. Every bad upload must end with the
precise gRPC status, the ErrorDetail reason in the `lbgm-error-bin` trailer
(where the server, not the transport, refuses) and a message naming what was
wrong; and the server's state digest (model, optimizer, every LBG mirror, the
open round's accepted set) must be the same before and after.

The federation is scripted so that nothing but the attacks can move the digest
(workers=3, min_workers=1: who has joined when a round opens decides who is sampled):

  round 1  the helper H (the attacker's second identity) alone; H's LBGs get version 1
           (layer 3 full of 2.0, so a huge rho can overflow it).
  round 2  H and the attacker A are sampled and upload nothing until every attack has
           run, so the round stays open; A holds no LBG yet. The legit worker process
           is started now: it joins but is not sampled before round 3.
  round 3  H, A and the legit worker upload; the run must finish.

The tests share one server and run in file order; round 2 closes in the last one.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
from grpc_tools import protoc

from lbgm.experiment.config import ExperimentConfig

from conftest import FAST, ServerProcess, join_request, start_server, start_worker

PROTO = Path(__file__).resolve().parents[1] / "proto" / "lbgm" / "v1" / "lbgm.proto"
CONFIG = ExperimentConfig(name="hostile", workers=3, min_workers=1, rounds=3, **{**FAST, "round_timeout": 120.0})
SHARD_SAMPLES = 12_000 // CONFIG.workers  # the embedded training set split iid: what an honest header claims
ERROR_DETAIL_KEY = "lbgm-error-bin"  # named in the .proto's ErrorDetail comment
OPERATOR_TOKEN = "hostile-test-operator-token"  # unlocks the state digest (the .proto's service comment)


def credentials(worker_id: int, token: bytes) -> tuple:
    """The call metadata of a worker call (the .proto's service comment)."""
    return ("lbgm-worker-id", str(worker_id)), ("lbgm-token-bin", token)
CHUNK = 1 << 20
SERVER_RECEIVE_LIMIT = 4 << 20  # lbgm.common.grpc_options.MAX_MESSAGE_BYTES: what the attacker must exceed


# ------------------------------------------------------------------ the hostile client's own stubs


@pytest.fixture(scope="module")
def hostile_stubs(tmp_path_factory) -> tuple[ModuleType, ModuleType]:
    """hostile_pb2 and hostile_pb2_grpc, compiled from a copy of the .proto.

    The package must stay lbgm.v1 (gRPC routes on /lbgm.v1.Aggregator/...), but the
    default descriptor pool already holds lbgm.v1 from the project's stubs, so the
    generated module registers its file in a pool of its own."""
    root = tmp_path_factory.mktemp("hostile_stubs")
    (root / "hostile.proto").write_text(PROTO.read_text())
    if protoc.main(["grpc_tools.protoc", f"-I{root}", f"--python_out={root}", f"--grpc_python_out={root}",
                    str(root / "hostile.proto")]) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    generated = root / "hostile_pb2.py"
    source = generated.read_text()
    assert source.count("_descriptor_pool.Default()") == 1, "protoc output changed shape"
    generated.write_text(source.replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()"))
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("hostile_pb2"), importlib.import_module("hostile_pb2_grpc")
    finally:
        sys.path.remove(str(root))


@dataclass(frozen=True)
class Identity:
    name: str
    worker_id: int
    token: bytes


@dataclass
class Federation:
    pb: ModuleType
    stub: Any
    server: ServerProcess
    tmp: Path
    legit: subprocess.Popen | None
    helper: Identity
    attacker: Identity
    shapes: list[tuple[int, ...]]
    round: int = 2  # the round every attack is aimed at
    malformed: int = 0  # MALFORMED refusals so far: the round's record must count each
    cut_by_transport: int = 0  # uploads the transport refused: the servicer may or may not have seen them cut short

    def digest(self) -> str:
        return self.stub.GetStatus(self.pb.StatusRequest(include_state_digest=True), timeout=30,
                                   metadata=(("lbgm-operator-token-bin", OPERATOR_TOKEN.encode()),)).state_digest

    def status(self):
        return self.stub.GetStatus(self.pb.StatusRequest(), timeout=30)

    def submit(self, parts: Iterable):
        """The upload, with the call metadata its header claims (the attacker's without a header)."""
        parts = list(parts)
        claimed = parts[0].header if parts and parts[0].WhichOneof("part") == "header" else self.attacker
        return self.stub.SubmitUpdate(iter(parts), timeout=60, metadata=credentials(claimed.worker_id, claimed.token))

    def task_shapes(self, who: Identity) -> tuple[int, list[tuple[int, ...]]]:
        """Round number and tensor shapes of `who`'s task (long poll until one arrives)."""
        request = self.pb.TaskRequest(worker_id=who.worker_id, token=who.token, max_wait_seconds=20)
        parts = list(self.stub.GetTask(request, timeout=60, metadata=credentials(who.worker_id, who.token)))
        assert parts[0].WhichOneof("part") == "task", f"{who.name} got {parts[0]} instead of a task"
        shapes = [tuple(p.tensor.meta.shape) for p in parts if p.WhichOneof("part") == "tensor"]
        return parts[0].task.round, shapes

    def wait_for_round(self, number: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.status()).round != number:
            assert time.monotonic() < deadline, f"round {number} never opened (status: {status})"
            time.sleep(0.05)


def join(stub, pb, name: str) -> Identity:
    reply = stub.Join(join_request(stub, name, pb=pb, protocol="lbgm.v1.1"), timeout=30)
    return Identity(name, reply.worker_id, reply.token)


# ------------------------------------------------------------------ building uploads from the .proto


def dtype_of(pb: ModuleType, array: np.ndarray) -> int:
    return {np.dtype("<f4"): pb.FLOAT32, np.dtype("<f8"): pb.FLOAT64, np.dtype("<f2"): pb.FLOAT16}[array.dtype]


def full_layer(f: Federation, layer: int, array: np.ndarray, version: int | None = None,
               data: bytes | None = None, nbytes: int | None = None, dtype: int | None = None) -> list:
    """A FullGradient (DENSE) and its TensorChunks; `data`, `nbytes`, `dtype` override what the array says."""
    raw = array.tobytes() if data is None else data  # the arrays are little-endian by construction
    meta = f.pb.TensorMeta(dtype=dtype_of(f.pb, array) if dtype is None else dtype, shape=array.shape,
                           nbytes=array.nbytes if nbytes is None else nbytes)
    chunks = [raw[start:start + CHUNK] for start in range(0, len(raw), CHUNK)] or [b""]
    head = f.pb.FullGradient(layer=layer, lbg_version=f.round if version is None else version,
                             codec=f.pb.DENSE, parts=[meta], data=chunks[0])
    return [f.pb.UpdatePart(full=head), *(f.pb.UpdatePart(chunk=f.pb.TensorChunk(data=c)) for c in chunks[1:])]


def header(f: Federation, who: Identity, round_number: int | None = None, token: bytes | None = None,
           worker_id: int | None = None, num_samples: int = SHARD_SAMPLES):
    return f.pb.UpdatePart(header=f.pb.UpdateHeader(
        worker_id=who.worker_id if worker_id is None else worker_id, token=who.token if token is None else token,
        round=f.round if round_number is None else round_number, num_samples=num_samples, train_loss=0.5))


def zeros(f: Federation, **replaced: np.ndarray) -> dict[int, np.ndarray]:
    """A zero gradient for every layer; `l<index>=array` replaces one."""
    layers = {layer: np.zeros(shape, "<f4") for layer, shape in enumerate(f.shapes)}
    layers.update({int(key[1:]): array for key, array in replaced.items()})
    return layers


def with_value(shape: tuple[int, ...], value: float, dtype: str = "<f4") -> np.ndarray:
    array = np.zeros(shape, dtype)
    array.reshape(-1)[len(array.reshape(-1)) // 2] = value
    return array


def upload(f: Federation, who: Identity, layers: dict[int, np.ndarray] | None = None,
           scalars: dict[int, tuple[float, int]] | None = None, round_number: int | None = None,
           **header_fields) -> list:
    """Header, the given layers in full (default: every layer, zeros), then {unit: (rho, version)}."""
    round_number = f.round if round_number is None else round_number
    parts = [header(f, who, round_number, **header_fields)]
    for layer, array in (zeros(f) if layers is None else layers).items():
        parts += full_layer(f, layer, array, version=round_number)
    if scalars:
        parts.append(f.pb.UpdatePart(scalars=f.pb.ScalarUpdate(
            units=list(scalars), rhos=[rho for rho, _ in scalars.values()],
            lbg_versions=[version for _, version in scalars.values()])))
    return parts


def with_layer_as(f: Federation, layer: int, parts: list) -> list:
    """A valid attacker upload in which `layer` travels as `parts` (every layer here fits one message)."""
    valid = upload(f, f.attacker)
    return valid[:1 + layer] + parts + valid[2 + layer:]


def scalars_for_every_unit(f: Federation, rho: float, version: int = 1) -> dict[int, tuple[float, int]]:
    return {unit: (rho, version) for unit in range(len(f.shapes))}


def error_detail(f: Federation, error: grpc.RpcError):
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return f.pb.ErrorDetail.FromString(value)
    return None


# ------------------------------------------------------------------ the attacks


def more_bytes_than_announced(f: Federation) -> list:
    parts = upload(f, f.attacker)
    return [*parts[:2], f.pb.UpdatePart(chunk=f.pb.TensorChunk(data=b"\0" * 4)), *parts[2:]]


def truncated(f: Federation) -> list:
    """Layer 0 announces all its bytes, half arrive, then the client closes the stream."""
    array = np.zeros(f.shapes[0], "<f4")
    return [header(f, f.attacker), *full_layer(f, 0, array, data=array.tobytes()[:array.nbytes // 2])]


def scalar_where_the_server_holds_no_lbg(f: Federation) -> list:
    layers = zeros(f)
    del layers[3]
    return upload(f, f.attacker, layers, scalars={3: (1.0, 1)})


def over_the_message_size_limit(f: Federation) -> list:
    array = np.zeros(SERVER_RECEIVE_LIMIT // 4 + 1024, "<f4")  # one FullGradient message > 4 MiB
    return [header(f, f.attacker), f.pb.UpdatePart(full=f.pb.FullGradient(
        layer=0, lbg_version=f.round, parts=[f.pb.TensorMeta(dtype=f.pb.FLOAT32, shape=array.shape,
                                                             nbytes=array.nbytes)], data=array.tobytes()))]


def without_header(f: Federation) -> list:
    return upload(f, f.attacker)[1:]


def every_layer_as_big_as_the_largest(f: Federation) -> list:
    """Each layer index once, each announcing layer 0's 627 kB: the third passes a model's worth."""
    return [header(f, f.attacker), *(part for layer in range(3)
                                     for part in full_layer(f, layer, np.zeros(f.shapes[0], "<f4")))]


def with_codec(f: Federation, codec: int) -> list:
    """A valid attacker upload whose layer 0 names `codec` (which may be one the .proto lacks)."""
    parts = upload(f, f.attacker)
    parts[1].full.codec = codec
    return parts


class Attack(NamedTuple):
    name: str
    build: Callable[[Federation], Iterable]
    code: grpc.StatusCode
    reason: str | None  # ErrorDetail.Reason name; None: the transport refuses, no trailer
    message: str
    stale_units: tuple[int, ...] = ()


INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
AUTH = grpc.StatusCode.UNAUTHENTICATED

ATTACKS = [
    Attack("wrong shape", lambda f: upload(f, f.attacker, zeros(f, l0=np.zeros(f.shapes[0][::-1], "<f4"))),
           INVALID, "MALFORMED", "dense tensor has shape [784, 200], expected [200, 784]"),
    Attack("wrong dtype", lambda f: upload(f, f.attacker, zeros(f, l0=np.zeros(f.shapes[0], "<f8"))),
           INVALID, "MALFORMED", "dtype torch.float64, expected torch.float32"),
    Attack("dtype the proto does not define", lambda f: with_layer_as(
        f, 0, full_layer(f, 0, np.zeros(f.shapes[0], "<f4"), dtype=42)),
           INVALID, "MALFORMED", "unknown wire dtype 42"),
    Attack("NaN value", lambda f: upload(f, f.attacker, zeros(f, l1=with_value(f.shapes[1], np.nan))),
           INVALID, "MALFORMED", "layer 1 contains NaN or Inf"),
    Attack("Inf value", lambda f: upload(f, f.attacker, zeros(f, l2=with_value(f.shapes[2], -np.inf))),
           INVALID, "MALFORMED", "layer 2 contains NaN or Inf"),
    Attack("layer index out of range", lambda f: upload(f, f.attacker, zeros(f, l4=np.zeros(10, "<f4"))),
           INVALID, "MALFORMED", "layer 4 out of range [0, 4)"),
    Attack("more chunk bytes than announced", more_bytes_than_announced,
           INVALID, "MALFORMED", "announced 627200 bytes but more arrived"),
    Attack("nbytes contradicting the shape", lambda f: with_layer_as(
        f, 1, full_layer(f, 1, np.zeros(f.shapes[1], "<f4"), data=b"\0" * 400, nbytes=400)),
           INVALID, "MALFORMED", "needs 800 bytes; header announced 400"),
    Attack("truncated stream", truncated, INVALID, "MALFORMED", "announced 627200 bytes but its data ended early"),
    Attack("a whole model's worth exceeded", every_layer_as_big_as_the_largest,
           INVALID, "MALFORMED", "more than the limit of"),
    Attack("codec the proto does not define", lambda f: with_codec(f, 77),
           INVALID, "MALFORMED", "layer 0 uses codec unknown (77)"),
    Attack("codec of another run", lambda f: with_codec(f, f.pb.TOPK),
           INVALID, "MALFORMED", "layer 0's TOPK payload lists 1 tensors, expected 2"),
    Attack("a layer sent twice", lambda f: upload(f, f.attacker)[:2] + upload(f, f.attacker)[1:],
           INVALID, "MALFORMED", "layer 0 sent twice"),
    Attack("an empty chunk", lambda f: [*upload(f, f.attacker)[:2], f.pb.UpdatePart(chunk=f.pb.TensorChunk())],
           INVALID, "MALFORMED", "empty chunk"),
    Attack("stale round", lambda f: upload(f, f.attacker, round_number=1),
           FAILED, "ROUND_CLOSED", "round 1 is not open (current round: 2)"),
    Attack("future round", lambda f: upload(f, f.attacker, round_number=3),
           FAILED, "ROUND_CLOSED", "round 3 is not open (current round: 2)"),
    Attack("unknown worker id", lambda f: upload(f, f.attacker, worker_id=99),
           AUTH, "UNAUTHENTICATED", "unknown worker id 99; join first"),
    Attack("forged worker id", lambda f: upload(f, f.attacker, worker_id=f.helper.worker_id),
           AUTH, "UNAUTHENTICATED", "bad token for worker 1"),
    Attack("wrong token", lambda f: upload(f, f.attacker, token=b"\x01" * 16),
           AUTH, "UNAUTHENTICATED", "bad token for worker 2"),
    Attack("scalar for a layer without LBG", scalar_where_the_server_holds_no_lbg,
           FAILED, "STALE_LBG", "resend those units in full", stale_units=(3,)),
    Attack("non-finite rho", lambda f: upload(f, f.helper, {}, scalars_for_every_unit(f, math.nan)),
           INVALID, "MALFORMED", "rho for unit 0 is not finite"),
    Attack("rho overflowing the LBG", lambda f: upload(f, f.helper, {}, scalars_for_every_unit(f, 3e38)),
           INVALID, "MALFORMED", "for unit 3 overflows its LBG to Inf"),
    Attack("zero samples", lambda f: upload(f, f.attacker, num_samples=0),
           INVALID, "MALFORMED", "num_samples must be positive"),
    Attack("more samples than the shard holds", lambda f: upload(f, f.attacker, num_samples=10**9),
           INVALID, "MALFORMED", f"shard holds {SHARD_SAMPLES} samples"),
    Attack("buffer the model does not have", lambda f: upload(f, f.attacker) + [f.pb.UpdatePart(
        buffer=f.pb.ModelTensor(index=0, meta=f.pb.TensorMeta(dtype=f.pb.FLOAT32, shape=[1], nbytes=4),
                                data=b"\0" * 4))],
           INVALID, "MALFORMED", "buffer 0 out of range [0, 0)"),
    Attack("message over the size limit", over_the_message_size_limit,
           grpc.StatusCode.RESOURCE_EXHAUSTED, None, "larger than max"),
    Attack("missing header", without_header, INVALID, "MALFORMED", "must start with its header, got full"),
    Attack("empty stream", lambda f: [], INVALID, "MALFORMED", "must start with its header, got nothing"),
]


# ------------------------------------------------------------------ the federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory, hostile_stubs) -> Iterator[Federation]:
    pb, pb_grpc = hostile_stubs
    tmp = tmp_path_factory.mktemp("hostile_run")
    server = start_server(tmp, CONFIG, ["--operator-token", OPERATOR_TOKEN])
    started: list[subprocess.Popen] = [server.process]
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        stub = pb_grpc.AggregatorStub(channel)
        helper = join(stub, pb, "helper")
        f = Federation(pb, stub, server, tmp, legit=None, helper=helper, attacker=helper, shapes=[])
        f.wait_for_round(1)  # opened for the helper alone
        f.attacker = join(stub, pb, "attacker")  # joins during round 1: sampled from round 2 on
        assert (helper.worker_id, f.attacker.worker_id) == (1, 2)
        round_number, f.shapes = f.task_shapes(helper)
        assert round_number == 1 and f.shapes == [(200, 784), (200,), (10, 200), (10,)]
        f.submit(upload(f, helper, zeros(f, l3=np.full(f.shapes[3], 2.0, "<f4")), round_number=1))
        f.wait_for_round(2)
        f.legit = start_worker(tmp, server.target, "legit")  # joins during round 2: sampled from round 3 on
        started.append(f.legit)
        assert f.task_shapes(f.attacker) == (2, f.shapes), "the attacker must be sampled in round 2"
        yield f
    finally:
        channel.close()
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_bad_upload_is_refused_precisely_and_changes_nothing(federation, attack):
    f = federation
    before = f.digest()
    with pytest.raises(grpc.RpcError) as refused:
        f.submit(attack.build(f))
    error = refused.value
    assert error.code() == attack.code, error.details()
    assert attack.message in error.details()
    detail = error_detail(f, error)
    if attack.reason is None:
        assert detail is None
        f.cut_by_transport += 1
        time.sleep(1.0)  # the transport refused first: give the servicer time to finish what it read
    else:
        assert f.pb.ErrorDetail.Reason.Name(detail.reason) == attack.reason
        assert tuple(detail.stale_units) == attack.stale_units
        f.malformed += attack.reason == "MALFORMED"
    assert f.digest() == before, f"{attack.name} changed the server's state"
    assert f.status().round == f.round


def submit_lazily(f: Federation, who: Identity, parts: Iterator):
    """An upload whose parts are made only as gRPC sends them, so a test sees how far the server read."""
    return f.stub.SubmitUpdate(parts, timeout=60, metadata=credentials(who.worker_id, who.token))


def refused_malformed(f: Federation, send: Callable[[], Any], message: str) -> float:
    """Seconds until `send` was refused with INVALID_ARGUMENT / MALFORMED naming `message`; the state is unchanged."""
    before = f.digest()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        send()
    elapsed = time.monotonic() - started
    assert refused.value.code() == INVALID and message in refused.value.details(), refused.value.details()
    assert error_detail(f, refused.value).reason == f.pb.ErrorDetail.MALFORMED
    f.malformed += 1
    assert f.digest() == before
    return elapsed


ENDLESS = {  # what the attacker repeats after a header and layer 0, and where the server says stop
    "the same layer": (lambda f: full_layer(f, 0, np.zeros(f.shapes[0], "<f4"))[0], "layer 0 sent twice"),
    "a chunk": (lambda f: f.pb.UpdatePart(chunk=f.pb.TensorChunk(data=b"\0" * CHUNK)), "but more arrived"),
    "an empty chunk": (lambda f: f.pb.UpdatePart(chunk=f.pb.TensorChunk()), "empty chunk"),
}
BIG_PART_BYTES = 600_000  # parts this big are held back by flow control, so what was sent tells what was read


@pytest.mark.parametrize("repeated", ENDLESS, ids=list(ENDLESS))
def test_an_endless_stream_is_cut_off_at_the_first_part_the_model_does_not_need(federation, repeated):
    """Issue 13, item 2: an upload holds at most one part per layer and buffer, a scalar part, and
    chunks of at least one byte up to what the parts announced; the first part beyond is refused
    (tests/test_wire_limits.py counts the parts the reader pulls)."""
    f = federation
    make, message = ENDLESS[repeated]
    sent = 0

    def endless() -> Iterator:
        nonlocal sent
        yield header(f, f.attacker)
        yield full_layer(f, 0, np.zeros(f.shapes[0], "<f4"))[0]
        part = make(f)
        for sent in range(1, 101):  # 100 MB of chunks if the server never says stop
            yield part

    refused_malformed(f, lambda: submit_lazily(f, f.attacker, endless()), message)
    if make(f).ByteSize() > BIG_PART_BYTES:
        assert sent < 50, f"the client sent {sent} copies of a {make(f).ByteSize()}-byte part before the refusal"


def test_a_shape_of_100000_dimensions_is_refused_in_bounded_time(federation):
    """Issue 13, item 1: a 900 kB TensorMeta of 100,000 dimensions of 2^62 held every server
    thread for 31 s (the shape was multiplied out) and ended in UNKNOWN."""
    f = federation
    meta = f.pb.TensorMeta(dtype=f.pb.FLOAT32, shape=[2**62] * 100_000, nbytes=0)
    bomb = f.pb.UpdatePart(full=f.pb.FullGradient(layer=0, lbg_version=f.round, parts=[meta]))
    assert 890_000 < bomb.ByteSize() < SERVER_RECEIVE_LIMIT
    elapsed = refused_malformed(f, lambda: f.submit([header(f, f.attacker), bomb]),
                                "tensor has 100000 dimensions, at most 8 are allowed")
    assert elapsed < 3.0, f"refused after {elapsed:.1f} s"


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def test_fifty_thousand_empty_tensors_per_message_are_refused_without_growing_memory(federation):
    """Issue 13, item 2: 20 messages listing 50,000 empty tensors each added 340 MB in 10 s."""
    f = federation
    empty = f.pb.TensorMeta(dtype=f.pb.FLOAT32, shape=[0], nbytes=0)
    message = f.pb.UpdatePart(full=f.pb.FullGradient(layer=0, lbg_version=f.round, parts=[empty] * 50_000))
    parts = [header(f, f.attacker), *[message] * 20]
    rss_before = resident_bytes(f.server.process.pid)
    elapsed = refused_malformed(f, lambda: f.submit(parts), "layer 0's DENSE payload lists 50000 tensors, expected 1")
    growth = resident_bytes(f.server.process.pid) - rss_before
    assert elapsed < 3.0 and growth < 8 << 20, f"refused after {elapsed:.1f} s, server grew by {growth} bytes"


def test_duplicate_upload_is_refused_after_the_first_is_accepted(federation):
    f = federation
    ack = f.submit(upload(f, f.attacker))
    assert (ack.round, ack.full_units, ack.scalar_units) == (2, 4, 0)
    accepted = f.digest()
    with pytest.raises(grpc.RpcError) as refused:
        f.submit(upload(f, f.attacker))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "worker 2 already submitted round 2" in refused.value.details()
    assert error_detail(f, refused.value).reason == f.pb.ErrorDetail.DUPLICATE
    assert f.digest() == accepted
    assert f.status().round == 2  # the helper has not uploaded yet


def test_legit_worker_and_the_run_still_complete(federation):
    f = federation
    deadline = time.monotonic() + 120
    while f.status().workers_joined < 3:  # joined before round 3 opens, so it is sampled there
        assert f.legit.poll() is None and time.monotonic() < deadline, (f.tmp / "legit.log").read_text()
        time.sleep(0.1)
    for number in (2, 3):
        f.wait_for_round(number)
        f.round = number
        for who in (f.attacker, f.helper):  # the helper's upload closes round 2
            try:
                f.submit(upload(f, who))
            except grpc.RpcError as error:  # the attacker's round-2 upload went through in the test above
                assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
    for who in (f.helper, f.attacker):  # hear that training finished, so the server need not wait for us
        request = f.pb.TaskRequest(worker_id=who.worker_id, token=who.token, max_wait_seconds=20)
        metadata = credentials(who.worker_id, who.token)
        while (part := next(iter(f.stub.GetTask(request, timeout=60, metadata=metadata)))).WhichOneof("part") \
                != "finished":
            assert part.WhichOneof("part") == "idle", f"{who.name} was given {part}"
    assert f.legit.wait(timeout=120) == 0, (f.tmp / "legit.log").read_text()
    assert f.server.process.wait(timeout=60) == 0, f.server.log()
    summary = json.loads((f.server.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == CONFIG.rounds
    records = [json.loads(line) for line in (f.server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in records] == [[1], [1, 2], [1, 2, 3]]
    counted = records[1]["refused"].get("MALFORMED", 0)
    assert f.malformed <= counted <= f.malformed + f.cut_by_transport, "every malformed upload counts as refused"
    assert math.isfinite(records[-1]["test_loss"])
