"""The server's downlink in update mode (issue 16): its state across rounds and what each worker's
GetTask stream carries. The math is lbgm.common.downlink's; this module keeps the state, turns a
worker's TaskRequest into a delivery plan and the plan into stream parts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lbgm.common.downlink import (
    DOWNLINK_DTYPES, Broadcast, DownlinkHistory, DownlinkState, Holding, broadcast_round, model_digest,
    plan_delivery, state_from_dict, state_to_dict, tensor_bytes,
)
from lbgm.common.wire import EncodedTensor, task_part_kinds, task_parts, update_task_parts, wire_size
from lbgm.experiment.config import ExperimentConfig
from lbgm.v1 import lbgm_pb2 as pb


@dataclass(frozen=True)
class DownlinkRound:
    """What the workers of one round may be sent: the history up to the task's model version, and the
    encodings every worker of the round shares (the round's full layers, the buffers)."""

    history: DownlinkHistory
    target: int
    dtype: torch.dtype
    params_bytes: int  # the parameters in float32: a replay must cost less
    num_params: int
    buffers: tuple[EncodedTensor, ...]
    encoded: dict[int, EncodedTensor] = field(default_factory=dict)  # id(payload) -> its encoding

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        found = self.encoded.get(id(tensor))
        return found if found is not None else EncodedTensor.of(tensor)

    def parts(self, task: pb.RoundTask, model: Sequence[EncodedTensor], request: pb.TaskRequest
              ) -> Iterator[tuple[str, pb.TaskPart]]:
        """The GetTask stream for the worker that sent `request`, each part with its byte-counter kind."""
        holding = Holding(request.model_version if request.model_digest else None, request.model_digest,
                          {v.unit: v.version for v in request.downlink_versions})
        delivery = plan_delivery(self.history, self.target, holding, self.params_bytes, self.dtype)
        worker_task = pb.RoundTask()
        worker_task.CopyFrom(task)
        worker_task.model_version = self.target
        worker_task.model_digest = self.history.digests[self.target]
        worker_task.drop_lookbacks = delivery.drop_lookbacks
        if delivery.whole:
            return task_part_kinds(task_parts(worker_task, model), "model")
        worker_task.model_updates = True
        worker_task.base_version = delivery.base
        worker_task.num_tensors = len(self.buffers)
        return task_part_kinds(update_task_parts(worker_task, delivery.items, self.buffers, self.num_params,
                                                 self.encode), "update")


def whole_model_bytes(task: pb.RoundTask, model: Sequence[EncodedTensor]) -> int:
    """What sending the whole float32 model costs, without the RoundTask: the delta = 0 downlink."""
    parts = task_parts(task, model)
    next(parts)
    return sum(wire_size(part) for part in parts)


class ServerDownlink:
    """The downlink LBGM's state on the server: look-backs, residual, history, digests."""

    def __init__(self, config: ExperimentConfig, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
                 version: int, saved: dict | None = None) -> None:
        """The state after `version` rounds: `saved` (a checkpoint's), else a fresh one whose only
        known model is this one (a checkpoint without downlink state: everyone gets it whole)."""
        self.delta = config.downlink_delta
        self.dtype = DOWNLINK_DTYPES[config.downlink_dtype]
        self.params_bytes = sum(tensor_bytes(p.to(torch.float32)) for p in params)
        if saved is not None:
            self.state, self.history = state_from_dict(saved)
        else:
            self.state = DownlinkState.initial(params)
            self.history = DownlinkHistory(self.params_bytes, digests={version: model_digest([*params, *buffers])})
        self.version = max(self.history.digests)

    def step(self, number: int, previous: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor] | None,
             buffers: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Broadcast]:
        """Round `number`'s broadcast and the new global parameters; candidate None: the round
        changed nothing (discarded, or no upload), so neither does the model."""
        if candidate is None:
            broadcast, params = Broadcast(number), list(previous)
        else:
            broadcast, params, self.state = broadcast_round(previous, candidate, self.state, self.delta, self.dtype,
                                                            number)
        self.history.add(broadcast, model_digest([*params, *buffers]))
        self.version = number
        return params, broadcast

    def round_view(self, buffers: Sequence[EncodedTensor], num_params: int) -> DownlinkRound:
        """What the workers of the round about to open (its model: the latest version) may be sent."""
        latest = self.history.broadcasts.get(self.version)
        encoded = {id(layer.payload): EncodedTensor.of(layer.payload)
                   for layer in (latest.layers if latest else ()) if layer.payload is not None}
        return DownlinkRound(self.history.view(), self.version, self.dtype, self.params_bytes, num_params,
                             tuple(buffers), encoded)

    def digest_hex(self) -> str:
        return self.history.digests[self.version].hex()

    def to_dict(self) -> dict:
        return state_to_dict(self.state, self.history)
