"""The downlink in update mode (issue 16): the server's broadcast math, the delivery plan per worker,
the workers' rebuild, and a multi-process gRPC federation whose workers hold the server's global model
bit for bit every round, through a worker killed and re-joining and a server killed and resumed."""

from __future__ import annotations

import random

import pytest
import torch

from lbgm.common.downlink import (
    Broadcast, DeliveredLookback, DeliveredScalar, DownlinkError, DownlinkHistory, DownlinkState, Holding,
    apply_delivery, broadcast_round, model_digest, plan_delivery, state_from_dict, state_to_dict,
)

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
