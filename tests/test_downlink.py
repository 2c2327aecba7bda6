"""The downlink in update mode (issue 16): the server's broadcast math, the delivery plan per worker,
the workers' rebuild, and a multi-process gRPC federation whose workers hold the server's global model
bit for bit every round, through a worker killed and re-joining and a server killed and resumed."""

from __future__ import annotations

import dataclasses
import random
import re
import signal

import pytest
import torch
from conftest import FAST, start_server, start_worker
from test_recovery import free_port, read_records, wait_for_rounds

from lbgm.common.downlink import (
    Broadcast, DeliveredLookback, DeliveredScalar, DownlinkError, DownlinkHistory, DownlinkState, Holding, Lookback,
    apply_delivery, broadcast_round, model_digest, plan_delivery, state_from_dict, state_to_dict,
)
from lbgm.common.state_files import load
from lbgm.common.model_spec import TensorSpec
from lbgm.common.wire import EncodedTensor, MalformedStream, ReceivedTask, read_task, update_task_parts
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.checkpoint import config_differences
from lbgm.sim.federation import simulate
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker.client import HeldModel, VirtualWorker

SHAPES = [(6, 5), (6,), (3, 6), (3,)]


def _bits(tensors):
    return [t.contiguous().view(torch.uint8).tolist() for t in tensors]


class Federation:
    """The server's downlink and a few workers that each receive only some rounds, in process:
    the pure functions exactly as the server and the workers call them."""

    def __init__(self, delta: float, dtype: torch.dtype, workers: int = 4, max_bytes: int | None = None,
                 seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.params = [torch.randn(shape, generator=generator) for shape in SHAPES]
        self.model_bytes = sum(p.numel() * 4 for p in self.params)
        self.state = DownlinkState.initial(self.params)
        self.history = DownlinkHistory(self.model_bytes if max_bytes is None else max_bytes)
        self.history.add(Broadcast(0), model_digest(self.params))
        self.delta, self.dtype = delta, dtype
        self.direction = [torch.randn(shape, generator=generator) for shape in SHAPES]
        self.version = 0
        self.wanted_sum = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
        self.sent_sum = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
        self.workers = [{"params": None, "version": None, "digest": b"", "lookbacks": {}} for _ in range(workers)]
        self.whole_deliveries = 0
        self.replays = 0

    def round(self, discard: bool = False) -> None:
        """One round: a candidate that mostly follows a slowly turning direction."""
        number = self.version + 1
        if discard:
            broadcast, params = Broadcast(number), self.params
        else:
            noise = [0.05 * torch.randn(shape, generator=self.generator) for shape in SHAPES]
            candidate = [p + 0.01 * (d + n) for p, d, n in zip(self.params, self.direction, noise)]
            for wanted, before, after in zip(self.wanted_sum, self.params, candidate):
                wanted += (after - before).double()
            broadcast, params, self.state = broadcast_round(self.params, candidate, self.state, self.delta,
                                                            self.dtype, number)
            for sent, before, after in zip(self.sent_sum, self.params, params):
                sent += (after - before).double()
        self.params = params
        self.version = number
        self.history.add(broadcast, model_digest(params))

    def deliver(self, index: int) -> None:
        """Bring worker `index` to the current version as the server and the worker do."""
        worker = self.workers[index]
        holding = Holding(worker["version"], worker["digest"], {l: lb.version for l, lb in worker["lookbacks"].items()})
        delivery = plan_delivery(self.history.view(), self.version, holding, self.model_bytes, self.dtype)
        if delivery.drop_lookbacks:
            worker["lookbacks"] = {}
        if delivery.whole:
            self.whole_deliveries += 1
            params = [p.clone() for p in self.params]
            lookbacks = worker["lookbacks"]
        else:
            self.replays += delivery.target - delivery.base > 1
            params, lookbacks = apply_delivery(worker["params"], worker["lookbacks"], delivery.base, delivery.target,
                                               delivery.items)
        digest = model_digest(params)
        assert digest == self.history.digests[self.version]
        worker.update(params=params, version=self.version, digest=digest, lookbacks=lookbacks)
        assert _bits(params) == _bits(self.params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_workers_rebuild_the_server_model_bit_for_bit(dtype):
    federation = Federation(delta=0.2, dtype=dtype, workers=5)
    rng = random.Random(1)
    scalars = 0
    for number in range(1, 61):
        federation.round(discard=number % 17 == 0)
        scalars += federation.history.broadcasts[number].scalar_units
        for index in range(5):
            if rng.random() < 0.5:  # sampled: some workers miss several rounds and get a replay
                federation.deliver(index)
    assert scalars > 60  # the look-back was used
    assert federation.replays > 0 and federation.whole_deliveries >= 5


def test_error_feedback_keeps_the_sum_of_updates():
    """sum of broadcasts + residual = sum of wanted updates: what a scalar leaves out is carried."""
    federation = Federation(delta=0.3, dtype=torch.float16)
    for _ in range(40):
        federation.round()
    for wanted, sent, residual in zip(federation.wanted_sum, federation.sent_sum, federation.state.residual):
        assert torch.allclose(sent + residual.double(), wanted, atol=1e-5)
    assert any(float(r.abs().max()) > 1e-4 for r in federation.state.residual)


def test_float32_without_lookback_sends_the_candidate_itself():
    federation = Federation(delta=0.0, dtype=torch.float32)
    before = [p.clone() for p in federation.params]
    federation.round()
    broadcast = federation.history.broadcasts[1]
    assert broadcast.full_units == len(SHAPES) and broadcast.scalar_units == 0
    assert all(torch.equal(r, torch.zeros_like(r)) for r in federation.state.residual)
    assert all(torch.equal(b + layer.payload, p) for b, layer, p in zip(before, broadcast.layers, federation.params))


def test_missing_lookback_travels_in_full_and_is_adopted():
    federation = Federation(delta=0.5, dtype=torch.float32, workers=1)
    federation.round()
    federation.deliver(0)  # whole model: the worker holds no look-back
    federation.round()
    assert federation.history.broadcasts[2].scalar_units > 0
    worker = federation.workers[0]
    holding = Holding(1, worker["digest"], {})
    delivery = plan_delivery(federation.history.view(), 2, holding, federation.model_bytes, torch.float32)
    lookbacks = [item for item in delivery.items if isinstance(item, DeliveredLookback)]
    assert lookbacks and all(item.version == 1 for item in lookbacks)
    federation.deliver(0)
    assert all(worker["lookbacks"][layer].version == 1 for layer in range(len(SHAPES)))


def test_unverifiable_claims_get_the_whole_model():
    federation = Federation(delta=0.2, dtype=torch.float32, workers=1)
    for _ in range(3):
        federation.round()
    history, digest = federation.history.view(), federation.history.digests[2]
    plan = lambda holding: plan_delivery(history, 3, holding, federation.model_bytes, torch.float32)  # noqa: E731
    assert plan(Holding()).whole and not plan(Holding()).drop_lookbacks
    wrong = plan(Holding(2, b"\0" * 16))
    assert wrong.whole and wrong.drop_lookbacks
    ahead = plan(Holding(7, digest))
    assert ahead.whole and ahead.drop_lookbacks
    assert not plan(Holding(2, digest)).whole


def test_history_bounded_by_bytes_and_costly_replays_refused():
    federation = Federation(delta=0.0, dtype=torch.float32, workers=1)
    federation.round()
    federation.deliver(0)
    for _ in range(3):
        federation.round()  # every layer in full each round: the history keeps about one model
    assert sorted(federation.history.broadcasts) == [4]
    plan = plan_delivery(federation.history.view(), 4, Holding(1, federation.workers[0]["digest"]),
                         federation.model_bytes, torch.float32)
    assert plan.whole and not plan.drop_lookbacks


def test_apply_refuses_what_it_cannot_rebuild():
    params = [torch.zeros(shape) for shape in SHAPES]
    with pytest.raises(DownlinkError, match="names look-back version 3"):
        apply_delivery(params, {}, 0, 1, [DeliveredScalar(1, 0, 0.5, 3)])
    with pytest.raises(DownlinkError, match="updates 1 of 4 layers"):
        apply_delivery(params, {}, 0, 1, [DeliveredLookback(1, 0, 1, torch.ones(SHAPES[0]))])
    with pytest.raises(DownlinkError, match="outside 1..1"):
        apply_delivery(params, {}, 0, 1, [DeliveredLookback(2, 0, 2, torch.ones(SHAPES[0]))])
    with pytest.raises(DownlinkError, match="shape"):
        apply_delivery(params, {}, 0, 1, [DeliveredLookback(1, 0, 1, torch.ones(2))])


def test_state_round_trips_through_a_checkpoint(tmp_path):
    federation = Federation(delta=0.2, dtype=torch.float16)
    for _ in range(5):
        federation.round()
    path = tmp_path / "downlink.pt"
    torch.save(state_to_dict(federation.state, federation.history), path)
    state, history = state_from_dict(torch.load(path, weights_only=True))
    assert history.digests == federation.history.digests
    assert sorted(history.broadcasts) == sorted(federation.history.broadcasts)
    for mine, theirs in zip(state.lookbacks, federation.state.lookbacks):
        assert mine.version == theirs.version and torch.equal(mine.tensor, theirs.tensor)
    assert all(torch.equal(a, b) for a, b in zip(state.residual, federation.state.residual))


# ------------------------------------------------------------------ a real federation

FEDERATION = ExperimentConfig(name="downlink", workers=4, rounds=14, fraction=0.5, delta=0.3, downlink_delta=0.3,
                              **{**FAST, "round_timeout": 5.0})
MODEL_LINE = re.compile(r"(\S+): round (\d+): global model version (\d+), digest ([0-9a-f]+) \((.*)\)")


def _model_lines(tmp_path) -> list[tuple[str, int, int, str, str]]:
    """(worker, round, version, digest, how it came) for every model a worker rebuilt and checked."""
    lines = []
    for path in sorted(tmp_path.glob("w*.log")):
        for match in MODEL_LINE.finditer(path.read_text()):
            name, number, version, digest, how = match.groups()
            lines.append((name, int(number), int(version), digest, how))
    return lines


def test_every_worker_holds_the_server_model_every_round_through_crashes(tmp_path, processes):
    """4 worker processes, half of them sampled per round, downlink LBGM on: every model a worker
    trains on has the digest of the server's global model of that version, including after a worker
    is killed and re-joins (it gets the whole model) and after the server is killed and resumed."""
    port = free_port()
    server = start_server(tmp_path, FEDERATION, port=port)
    processes.append(server.process)
    names = [f"w{i}" for i in range(4)]
    workers = {name: start_worker(tmp_path, server.target, name, extra_args=["--give-up-after", "120"])
               for name in names}
    processes.extend(workers.values())
    wait_for_rounds(server.run_dir, 3)
    workers["w3"].send_signal(signal.SIGKILL)
    workers["w3"].wait()
    wait_for_rounds(server.run_dir, len(read_records(server.run_dir)) + 2)
    workers["w3"] = start_worker(tmp_path, server.target, "w3", extra_args=["--give-up-after", "120"])
    processes.append(workers["w3"])
    wait_for_rounds(server.run_dir, 9)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    crashed = read_records(server.run_dir)
    # A longer round timeout (a setting a resumed run may change) lets every worker re-join before round 1 of
    # the resumed server: the workers' back-off grows to 20 s while it is down.
    resumed = start_server(tmp_path, dataclasses.replace(FEDERATION, round_timeout=30.0), extra_args=["--resume"],
                           port=port, log_name="resumed.log")
    processes.append(resumed.process)
    assert resumed.process.wait(timeout=120) == 0, resumed.log()
    assert all(worker.wait(timeout=60) == 0 for worker in workers.values())

    records = read_records(resumed.run_dir)
    assert [r["round"] for r in records] == list(range(1, FEDERATION.rounds + 1))
    digests = {r["round"]: {r["model_digest"]} for r in records}  # version -> the server's model digests
    for record in crashed:  # the rounds the crash lost were redone: either run's model is the server's
        digests[record["round"]].add(record["model_digest"])
    final = load(resumed.run_dir / "final_model.pt")
    assert model_digest([*final["params"], *final["buffers"]]).hex() == records[-1]["model_digest"]

    lines = _model_lines(tmp_path)
    initial = {digest for _, _, version, digest, _ in lines if version == 0}
    assert len(initial) == 1
    digests[0] = initial
    for name, number, version, digest, how in lines:
        assert version == number - 1
        assert digest in digests[version], (name, number, how)
    ids = {int(match[1]): match[0] for match in re.findall(r"(w\d) (?:re-)?joined as worker (\d+)",
                                                           server.log() + resumed.log())}
    trained = {(name, number) for name, number, *_ in lines}
    for record in records:  # every upload the server aggregated was trained on a checked model
        assert all((ids[p], record["round"]) in trained for p in record["participants"]), record["round"]
    hows = [how for *_, how in lines]
    assert sum(how == "whole" for how in hows) >= 5  # first rounds, the re-joined worker, unverifiable claims
    assert any(how.startswith("updates") for how in hows)
    checkpointed = int(resumed.log().split("after round ")[1].split(":")[0])
    # The resumed server verified what the workers held and sent updates again.
    assert any(how.startswith("updates") for _, number, _, _, how in lines if number > checkpointed + 1)
    assert sum(r["downlink_scalar_units"] for r in records) > 0
    assert sum(r["downlink_by_kind"].get("scalar", 0) for r in records) > 0
    assert "resumed from" in resumed.log()
    logs = "".join(path.read_text() for path in tmp_path.glob("w*.log"))
    assert "cannot rebuild" not in logs


HALF = ExperimentConfig(name="half", workers=4, rounds=8, delta=0.5, downlink_delta=0.5, downlink_dtype="float16",
                        **FAST)


def test_float16_downlink_run_matches_the_simulation(tmp_path, processes):
    """Two worker processes of two virtual workers each, a float16 downlink with LBGM: the final model and
    every round's downlink decisions are the in-process simulation's, and after the first round the
    downlink moves at most half the bytes of the whole float32 model."""
    server = start_server(tmp_path, HALF)
    processes.append(server.process)
    workers = [start_worker(tmp_path, server.target, f"w{i}", virtual_workers=2) for i in range(2)]
    processes.extend(workers)
    assert server.process.wait(timeout=120) == 0, server.log()
    assert all(worker.wait(timeout=60) == 0 for worker in workers)
    records = read_records(server.run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers train (lbgm worker --torch-threads 1): the same float sums
    try:
        reference = simulate(HALF)
    finally:
        torch.set_num_threads(threads)
    final = load(server.run_dir / "final_model.pt")
    for distributed, simulated in zip(final["params"], reference.params, strict=True):
        assert torch.allclose(distributed, simulated, atol=1e-6)
    assert [r["downlink_scalar_units"] for r in records] == [r["downlink_scalar_units"] for r in reference.rounds]
    assert sum(r["downlink_scalar_units"] for r in records) > 0
    # Round 1 sends the whole float32 model; each round after it about half of that or less.
    assert all(r["downlink_bytes"] < 0.51 * r["full_equivalent_downlink_bytes"] for r in records[1:])
    digests = {r["round"]: r["model_digest"] for r in records}
    lines = _model_lines(tmp_path)
    assert len(lines) >= 4 * HALF.rounds
    assert all(digest == digests[version] for _, _, version, digest, _ in lines if version > 0)


def _update_stream(items, base=0, target=2, updates=True):
    task = pb.RoundTask(round=target + 1, model_version=target, model_digest=b"d" * 16, model_updates=updates,
                        base_version=base, num_tensors=1)
    return list(update_task_parts(task, items, [EncodedTensor.of(torch.ones(2))], len(SHAPES)))


def test_task_stream_round_trip_and_malformed_streams():
    payload = torch.arange(30, dtype=torch.float16).reshape(6, 5)
    items = [DeliveredLookback(1, 0, 1, payload), DeliveredScalar(1, 1, 0.5, 0),
             DeliveredLookback(2, 2, 1, torch.ones(SHAPES[2])), DeliveredScalar(2, 2, -1.5, 1)]
    parts = _update_stream(items)
    received = read_task(parts, 1 << 20)
    assert [type(i) for i in received.updates] == [type(i) for i in items]
    assert torch.equal(received.updates[0].payload, payload) and received.updates[3].rho == -1.5
    assert torch.equal(received.tensors[0], torch.ones(2))
    scalars_first = [parts[0], parts[2], parts[1], *parts[3:]]
    for stream, message in [
        (scalars_first, "out of order"),
        (_update_stream(items, base=1), "out of order"),  # round 1 is not after the base
        (_update_stream(items, target=1), "out of order"),  # round 2 is past the target
        (_update_stream(items, updates=False), "unexpected downlink look-back"),
        ([*parts[:1], parts[-1], *parts[1:-1]], "after the buffers"),
    ]:
        with pytest.raises(MalformedStream, match=message):
            read_task(stream, 1 << 20)


def test_checkpoints_from_before_the_downlink_resume_with_it_off():
    settings = dataclasses.asdict(ExperimentConfig())
    before = {key: value for key, value in settings.items() if not key.startswith("downlink")}
    assert config_differences(before, settings) == []
    assert config_differences(before, dataclasses.asdict(ExperimentConfig(downlink_delta=0.2))) == [
        "downlink_delta was 0.0, now 0.2"]


def test_a_worker_never_takes_a_model_whose_digest_differs():
    """The real worker's rebuild: a whole model and updates are taken only with the task's digest; anything
    else leaves the worker holding nothing (its next poll asks for the whole model), look-backs dropped."""
    worker = VirtualWorker("w", "127.0.0.1:1")
    worker.model_description = [TensorSpec(f"p{i}", shape, "float32", False) for i, shape in enumerate(SHAPES)]
    federation = Federation(delta=0.5, dtype=torch.float32, workers=1)
    federation.round()
    federation.round()

    def task(version, digest, **fields):
        return pb.RoundTask(round=version + 1, model_version=version, model_digest=digest, **fields)

    whole = ReceivedTask(task(2, federation.history.digests[2]), [p.clone() for p in federation.params])
    assert _bits(worker._global_model(whole)) == _bits(federation.params)
    assert worker._task_request().model_digest == federation.history.digests[2]
    tampered = [p.clone() for p in federation.params]
    tampered[0][0, 0] += 1e-6
    assert worker._global_model(ReceivedTask(task(2, federation.history.digests[2]), tampered)) is None
    assert worker.held is None and not worker._task_request().model_digest

    worker.held = HeldModel(list(federation.params), [], 2, federation.history.digests[2])
    worker.downlink_lookbacks = {0: Lookback(torch.ones(SHAPES[0]), 1)}
    federation.round()
    wrong_base = ReceivedTask(task(3, federation.history.digests[3], model_updates=True, base_version=1), [])
    assert worker._global_model(wrong_base) is None and worker.downlink_lookbacks == {}
    worker.held = HeldModel(list(federation.params), [], 2, federation.history.digests[2])
    lying = ReceivedTask(task(3, b"\0" * 16, model_updates=True, base_version=2), [],
                         updates=[DeliveredLookback(3, layer, 3, torch.zeros(shape)) for layer, shape in
                                  enumerate(SHAPES)])
    assert worker._global_model(lying) is None and worker.held is None
