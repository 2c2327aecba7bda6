"""The downlink as versioned global updates, with LBGM on the server's side (issue 16): pure math.

The global model's version is the number of completed rounds; round r turns version r - 1 into
version r. In update mode (downlink_delta > 0 or a float16 downlink) the server does not send the
model but the round's global update D, layer by layer (one parameter tensor each):

    U = (theta_candidate - theta_previous) + e          the wanted update plus the residual e
    D = rho * L        if the layer has a look-back L and 1 - cos^2(U, L) <= downlink_delta
    D = U              otherwise, through the downlink dtype; L := D (version r)
    e <- U - D                                           error feedback: nothing is lost
    theta <- theta_previous + D                          the new global model

L is the layer's downlink look-back update: the last D broadcast in full. Because the server's
global model is built by the same float32 operations a worker runs on the bytes it receives
(`layer_update`, `torch.add`), every worker that applies the broadcasts holds the server's model
bit for bit, which `model_digest` lets both sides check. The aggregation and the server optimizer
still see the candidate; what a scalar leaves out reaches the workers in later rounds through e.

A worker that lacks the look-back a scalar names gets that look-back in full (it is exactly
representable in the downlink dtype, since it travelled in it) and adopts it, instead of the
float32 product rho * L: the same or fewer bytes, and its next scalars for that layer are cheap.
A worker that missed rounds gets the broadcasts it missed, in order, when they cost fewer bytes
than the whole model; a worker whose model cannot be verified gets the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lbgm.common.lookback import decide, rebuild
from lbgm.common.state_files import content_digest

DIGEST_BYTES = 16  # of SHA-256: a model's identity on the wire
SCALAR_ENTRY_BYTES = 12  # about what one layer's entry adds to a packed scalar message
FULL_HEADER_BYTES = 32  # about what a full layer's message adds to its payload bytes
DOWNLINK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class DownlinkError(ValueError):
    """Updates that cannot be applied to the model and look-backs held (e.g. a scalar names a
    look-back the worker lacks): never a wrong model, the caller asks for the whole one instead."""


def model_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """The identity of a model (parameters, then buffers): the first 16 bytes of SHA-256 over
    every tensor's dtype, shape and bytes."""
    return bytes.fromhex(content_digest(tensors))[:DIGEST_BYTES]


def layer_update(payload: torch.Tensor | None, rho: float, lookback: torch.Tensor | None) -> torch.Tensor:
    """D of one layer in float32: the payload sent in full, or rho times the look-back. The server
    and every worker compute D with this function, so D is the same bits on both sides."""
    if payload is not None:
        return payload.to(torch.float32)
    assert lookback is not None
    return rebuild((lookback,), rho)[0]


def apply_update(param: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """theta_previous + D, the one float32 operation that makes the next global model."""
    return torch.add(param, update)


# ------------------------------------------------------------------ the server's broadcast


@dataclass(frozen=True)
class Lookback:
    """A downlink look-back update: one layer's last D broadcast in full (float32) and its round."""

    tensor: torch.Tensor
    version: int


@dataclass(frozen=True)
class LayerBroadcast:
    """One layer of one round's broadcast: `payload` in full (downlink dtype), or `rho` times the
    look-back `lookback` of version `lbg_version` (kept by reference for workers that lack it)."""

    layer: int
    payload: torch.Tensor | None = None
    rho: float = 0.0
    lbg_version: int = 0
    lookback: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        return self.payload is not None


@dataclass(frozen=True)
class Broadcast:
    """Round `round`'s global update, every layer; no layers: the round changed nothing (it was
    discarded or nobody uploaded)."""

    round: int
    layers: tuple[LayerBroadcast, ...] = ()

    @property
    def full_units(self) -> int:
        return sum(layer.full for layer in self.layers)

    @property
    def scalar_units(self) -> int:
        return len(self.layers) - self.full_units

    @property
    def payload_bytes(self) -> int:
        return sum(tensor_bytes(layer.payload) for layer in self.layers if layer.payload is not None)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class DownlinkState:
    """The server's side of the downlink LBGM: per layer its look-back (None before its first full
    broadcast) and its error-feedback residual e."""

    lookbacks: tuple[Lookback | None, ...]
    residual: tuple[torch.Tensor, ...]

    @classmethod
    def initial(cls, params: Sequence[torch.Tensor]) -> DownlinkState:
        return cls(tuple(None for _ in params), tuple(torch.zeros_like(p, dtype=torch.float32) for p in params))


def broadcast_round(previous: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor], state: DownlinkState,
                    delta: float, dtype: torch.dtype, round_number: int
                    ) -> tuple[Broadcast, list[torch.Tensor], DownlinkState]:
    """(round's broadcast, the new global model's parameters, the new state) from the model before
    the round and the aggregation's candidate (see the module's docstring)."""
    layers, params, lookbacks, residual = [], [], [], []
    for index, (before, after, held, carried) in enumerate(
            zip(previous, candidate, state.lookbacks, state.residual, strict=True)):
        wanted = (after.to(torch.float32) - before.to(torch.float32)) + carried
        decision = decide([wanted], None if held is None else [held.tensor], delta)
        if decision.send_scalar:
            assert held is not None
            item = LayerBroadcast(index, rho=decision.rho, lbg_version=held.version, lookback=held.tensor)
            update = layer_update(None, item.rho, held.tensor)
        else:
            item = LayerBroadcast(index, payload=wanted.to(dtype))
            update = layer_update(item.payload, 0.0, None)
            held = Lookback(update, round_number)
        layers.append(item)
        params.append(apply_update(before, update))
        lookbacks.append(held)
        residual.append(wanted - update)
    return Broadcast(round_number, tuple(layers)), params, DownlinkState(tuple(lookbacks), tuple(residual))


# ------------------------------------------------------------------ history and delivery


@dataclass
class DownlinkHistory:
    """What the server broadcast lately, and the digest of every model version since the start.

    Broadcasts are kept while their full payloads add up to at most `max_bytes` (about the model's
    size: a replay costing more than the whole model is never chosen); the latest is always kept."""

    max_bytes: int
    broadcasts: dict[int, Broadcast] = field(default_factory=dict)  # round -> its broadcast
    digests: dict[int, bytes] = field(default_factory=dict)  # version -> model_digest

    def add(self, broadcast: Broadcast, digest: bytes) -> None:
        self.broadcasts[broadcast.round] = broadcast
        self.digests[broadcast.round] = digest
        kept = sum(b.payload_bytes for b in self.broadcasts.values())
        while kept > self.max_bytes and len(self.broadcasts) > 1:
            oldest = min(self.broadcasts)
            kept -= self.broadcasts.pop(oldest).payload_bytes

    def view(self) -> DownlinkHistory:
        """A copy that later rounds do not change (the tensors are shared: nothing mutates them)."""
        return DownlinkHistory(self.max_bytes, dict(self.broadcasts), dict(self.digests))

    def oldest_base(self) -> int:
        """The oldest version from which every broadcast up to the latest is kept."""
        version = max(self.digests)
        while version in self.broadcasts:
            version -= 1
        return version


@dataclass(frozen=True)
class Holding:
    """What a worker says it holds: a model version and its digest (None: nothing), and the version
    of each downlink look-back it holds, by layer."""

    version: int | None = None
    digest: bytes = b""
    lookbacks: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveredLookback:
    """A look-back update in full: the worker adopts it for `layer` as version `version`. With
    version == round it is also that round's update of the layer."""

    round: int
    layer: int
    version: int
    payload: torch.Tensor


@dataclass(frozen=True)
class DeliveredScalar:
    """Round `round`'s update of `layer` is rho times the look-back of version `lbg_version`."""

    round: int
    layer: int
    rho: float
    lbg_version: int


Delivered = DeliveredLookback | DeliveredScalar


@dataclass(frozen=True)
class Delivery:
    """What one worker is sent: the updates of rounds base + 1 .. target (in order, look-backs of a
    round before its scalars), or (whole) the whole model. `drop_lookbacks`: the worker's claim
    could not be verified, so its look-backs cannot be trusted either."""

    target: int
    whole: bool
    base: int = 0
    items: tuple[Delivered, ...] = ()
    drop_lookbacks: bool = False


def plan_delivery(history: DownlinkHistory, target: int, holding: Holding, model_bytes: int,
                  dtype: torch.dtype) -> Delivery:
    """How to bring a worker from what it holds to version `target` (see Delivery)."""
    if holding.version is None:
        return Delivery(target, whole=True)
    if history.digests.get(holding.version) != holding.digest or holding.version > target:
        return Delivery(target, whole=True, drop_lookbacks=True)
    if holding.version < history.oldest_base():
        return Delivery(target, whole=True)
    versions = dict(holding.lookbacks)
    items: list[Delivered] = []
    cost = 0
    for number in range(holding.version + 1, target + 1):
        broadcast = history.broadcasts[number]
        lookbacks, scalars = [], []
        for layer in broadcast.layers:
            if layer.payload is not None:
                lookbacks.append(DeliveredLookback(number, layer.layer, number, layer.payload))
                versions[layer.layer] = number
                cost += tensor_bytes(layer.payload) + FULL_HEADER_BYTES
                continue
            if versions.get(layer.layer) != layer.lbg_version:
                assert layer.lookback is not None
                payload = layer.lookback.to(dtype)  # exact: the look-back travelled in this dtype
                lookbacks.append(DeliveredLookback(number, layer.layer, layer.lbg_version, payload))
                versions[layer.layer] = layer.lbg_version
                cost += tensor_bytes(payload) + FULL_HEADER_BYTES
            scalars.append(DeliveredScalar(number, layer.layer, layer.rho, layer.lbg_version))
            cost += SCALAR_ENTRY_BYTES
        items += lookbacks + scalars
    if target - holding.version > 1 and cost >= model_bytes:
        return Delivery(target, whole=True)
    return Delivery(target, whole=False, base=holding.version, items=tuple(items))


def apply_delivery(params: Sequence[torch.Tensor], lookbacks: Mapping[int, Lookback], base: int, target: int,
                   items: Sequence[Delivered]) -> tuple[list[torch.Tensor], dict[int, Lookback]]:
    """The parameters of version `target` and the look-backs after it, from those of version `base`
    (neither input is changed). DownlinkError if the items do not make every changed round whole."""
    params = list(params)
    held = dict(lookbacks)
    position = 0
    for number in range(base + 1, target + 1):
        updated: set[int] = set()
        while position < len(items) and items[position].round == number:
            item = items[position]
            position += 1
            if not 0 <= item.layer < len(params):
                raise DownlinkError(f"round {number} updates layer {item.layer}; the model has {len(params)}")
            if isinstance(item, DeliveredLookback):
                if item.version > number or tuple(item.payload.shape) != tuple(params[item.layer].shape):
                    raise DownlinkError(f"round {number}'s look-back for layer {item.layer} has version "
                                        f"{item.version} and shape {list(item.payload.shape)}")
                held[item.layer] = Lookback(layer_update(item.payload, 0.0, None), item.version)
                if item.version != number:
                    continue
                update = held[item.layer].tensor
            else:
                lookback = held.get(item.layer)
                if lookback is None or lookback.version != item.lbg_version:
                    have = "none" if lookback is None else f"version {lookback.version}"
                    raise DownlinkError(f"round {number}'s scalar for layer {item.layer} names look-back version "
                                        f"{item.lbg_version}; held: {have}")
                update = layer_update(None, item.rho, lookback.tensor)
            if item.layer in updated:
                raise DownlinkError(f"round {number} updates layer {item.layer} twice")
            updated.add(item.layer)
            params[item.layer] = apply_update(params[item.layer], update)
        if updated and len(updated) != len(params):
            raise DownlinkError(f"round {number} updates {len(updated)} of {len(params)} layers")
    if position != len(items):
        raise DownlinkError(f"an update names round {items[position].round}, outside {base + 1}..{target}")
    return params, held


# ------------------------------------------------------------------ checkpoints


def state_to_dict(state: DownlinkState, history: DownlinkHistory) -> dict:
    """The downlink state as plain containers of tensors (for torch.save with weights_only loading)."""
    return {
        "lookbacks": [None if lb is None else {"tensor": lb.tensor, "version": lb.version} for lb in state.lookbacks],
        "residual": list(state.residual),
        "max_bytes": history.max_bytes,
        "digests": [(version, digest.hex()) for version, digest in sorted(history.digests.items())],
        "broadcasts": [
            {"round": b.round, "layers": [
                {"layer": layer.layer, "payload": layer.payload, "rho": layer.rho, "lbg_version": layer.lbg_version,
                 "lookback": layer.lookback} for layer in b.layers]}
            for _, b in sorted(history.broadcasts.items())],
    }


def state_from_dict(saved: dict) -> tuple[DownlinkState, DownlinkHistory]:
    lookbacks = tuple(None if lb is None else Lookback(lb["tensor"], int(lb["version"])) for lb in saved["lookbacks"])
    history = DownlinkHistory(int(saved["max_bytes"]), digests={int(v): bytes.fromhex(d) for v, d in saved["digests"]})
    for entry in saved["broadcasts"]:
        layers = tuple(LayerBroadcast(int(item["layer"]), item["payload"], float(item["rho"]),
                                      int(item["lbg_version"]), item["lookback"]) for item in entry["layers"])
        history.broadcasts[int(entry["round"])] = Broadcast(int(entry["round"]), layers)
    return DownlinkState(lookbacks, tuple(saved["residual"])), history
