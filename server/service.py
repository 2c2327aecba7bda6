"""gRPC servicer: turns messages into Coordinator calls and results back into
messages. No federated-learning logic lives here."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import grpc

from lbgm.common.wire import MalformedStream, read_update_body, read_update_header, task_parts, wire_size
from lbgm.common.grpc_options import ERROR_DETAIL_KEY, PROTOCOL
from lbgm.server.registry import AuthError, FederationFull, WorkerRecord
from lbgm.server.rounds import Coordinator, RoundTaskSnapshot
from lbgm.server.updates import UpdateRejected
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

UNAUTHENTICATED_WORKER = 0  # byte counters' slot for callers that never proved who they are
PEER_NAME_KEY = "x509_common_name"  # auth-context property: subject CN of the verified client certificate

STATUS_OF_REASON = {
    pb.ErrorDetail.STALE_LBG: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ErrorDetail.ROUND_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ErrorDetail.NOT_SAMPLED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ErrorDetail.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    pb.ErrorDetail.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    pb.ErrorDetail.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}


def abort(context: grpc.ServicerContext, reason: int, message: str, stale_units: list[int] | None = None,
          current_round: int = 0) -> None:
    """End the call with a status and a machine-readable ErrorDetail trailer."""
    detail = pb.ErrorDetail(reason=reason, stale_units=stale_units or [], current_round=current_round)
    context.set_trailing_metadata(((ERROR_DETAIL_KEY, detail.SerializeToString()),))
    context.abort(STATUS_OF_REASON[reason], message)


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The Common Name of the caller's verified client certificate; None if it presented none."""
    names = context.auth_context().get(PEER_NAME_KEY)
    return names[0].decode(errors="replace") if names else None


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(self, coordinator: Coordinator, max_poll_seconds: float = 30.0,
                 check_peer_names: bool = False) -> None:
        self.coordinator = coordinator
        self.max_poll_seconds = max_poll_seconds
        # Mutual TLS: a caller may act only as the worker its certificate names, whatever tokens it holds.
        self.check_peer_names = check_peer_names
        # No legitimate layer is bigger than the model's largest at 8 bytes per value.
        self.max_tensor_bytes = max(math.prod(shape) for shape in coordinator.layer_shapes) * 8
        # Nor does an upload carry more than every layer and buffer once at that size.
        self.max_update_bytes = 8 * sum(math.prod(shape) for shape in (
            *coordinator.layer_shapes, *(shape for shape, _ in coordinator.rules.buffer_specs)))

    def _check_peer(self, worker_name: str, context: grpc.ServicerContext) -> None:
        if self.check_peer_names and (certified := peer_name(context)) != worker_name:
            claimed = repr(worker_name[:130])  # Join has not checked the name's length yet
            log.warning("refused a call as worker %s from a client certified as %r", claimed, certified)
            abort(context, pb.ErrorDetail.UNAUTHENTICATED,
                  f"the client certificate is for {certified!r}, not for worker {claimed}")

    def _authenticate(self, worker_id: int, token: bytes, context: grpc.ServicerContext) -> WorkerRecord:
        try:
            record = self.coordinator.registry.authenticate(worker_id, token)
        except AuthError as error:
            abort(context, pb.ErrorDetail.UNAUTHENTICATED, str(error))
            raise  # unreachable: abort raises
        self._check_peer(record.name, context)
        return record

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if request.protocol != PROTOCOL:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"server speaks {PROTOCOL}, worker asked for {request.protocol!r}")
        self._check_peer(request.worker_name, context)
        try:
            record, versions = self.coordinator.join(request.worker_name)
        except FederationFull as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.JoinReply(
            worker_id=record.worker_id, token=record.token, shard_index=record.shard_index,
            experiment=self.coordinator.experiment_spec(record.shard_index),
            lbg_versions=[pb.UnitVersion(unit=u, version=v) for u, v in sorted(versions.items())],
        )

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskPart]:
        record = self._authenticate(request.worker_id, request.token, context)
        wait = min(max(request.max_wait_seconds, 0.0), self.max_poll_seconds)
        result = self.coordinator.wait_for_task(record.worker_id, wait)
        if isinstance(result, RoundTaskSnapshot):
            parts = task_parts(result.task, result.model)
            kinds = ("task",)
        else:
            parts = iter([pb.TaskPart(idle=pb.Idle()) if result is None else pb.TaskPart(finished=result)])
            kinds = ("control",)
        for index, part in enumerate(parts):
            kind = kinds[0] if index == 0 else "model"
            self.coordinator.count_downlink(record.worker_id, kind, wire_size(part))
            yield part

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext) -> pb.UpdateAck:
        stream = iter(request_iterator)
        try:
            update = read_update_header(stream)
        except MalformedStream as error:
            self.coordinator.record_refusal(UNAUTHENTICATED_WORKER, pb.ErrorDetail.MALFORMED, 0)
            abort(context, pb.ErrorDetail.MALFORMED, str(error))
        record = self._authenticate(update.header.worker_id, update.header.token, context)
        try:
            read_update_body(update, stream, self.max_tensor_bytes, self.max_update_bytes)
        except MalformedStream as error:
            self.coordinator.record_refusal(record.worker_id, pb.ErrorDetail.MALFORMED, update.wire_bytes)
            log.warning("refused malformed upload from worker %d: %s", record.worker_id, error)
            abort(context, pb.ErrorDetail.MALFORMED, str(error))
        try:
            accepted = self.coordinator.submit(record.worker_id, update)
        except UpdateRejected as error:
            log.warning("refused upload from worker %d for round %d: %s", record.worker_id, update.header.round, error)
            abort(context, error.reason, str(error), error.stale_units, self.coordinator.status().round)
        return pb.UpdateAck(round=update.header.round, full_units=accepted.full_units,
                            scalar_units=accepted.scalar_units)

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return self.coordinator.status(request.include_state_digest)

