"""gRPC servicer: turns messages into Coordinator calls and results back into
messages. No federated-learning logic lives here."""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable, Iterator

import grpc

from lbgm.common.wire import (
    MalformedStream, UploadLimits, UploadMessage, read_update_body, read_update_header, wire_size,
)
from lbgm.common.grpc_options import (
    ERROR_DETAIL_KEY, JOIN_TOKEN_KEY, OPERATOR_TOKEN_KEY, PROTOCOL, WORKER_ID_KEY, WORKER_TOKEN_KEY,
)
from lbgm.server.limits import LatestCalls, poll_window
from lbgm.server.registry import AuthError, FederationFull, WorkerRecord, check_worker_name
from lbgm.common.model_spec import specs_from_proto
from lbgm.server.rounds import Coordinator, ModelRefused, RoundTaskSnapshot
from lbgm.server.updates import UpdateRejected
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

UNAUTHENTICATED_WORKER = 0  # byte counters' slot for callers that never proved who they are
PEER_NAME_KEY = "x509_common_name"  # auth-context property: subject CN of the verified client certificate
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
GET_TASK, SUBMIT_UPDATE = f"/{SERVICE_NAME}/GetTask", f"/{SERVICE_NAME}/SubmitUpdate"
SUBMIT_EVALUATION = f"/{SERVICE_NAME}/SubmitEvaluation"
# The calls that act as a worker (lbgm.server.callguard)
WORKER_METHODS = frozenset({GET_TASK, SUBMIT_UPDATE, SUBMIT_EVALUATION})
# The calls whose messages the guard passes on as bytes: lbgm.common.wire reads an upload's chunks from them
# without copying each into a parsed message first (SubmitUpdate also takes parsed UpdateParts).
RAW_REQUEST_METHODS = frozenset({SUBMIT_UPDATE})

STATUS_OF_REASON = {
    pb.ErrorDetail.STALE_LBG: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ErrorDetail.ROUND_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ErrorDetail.NOT_SAMPLED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ErrorDetail.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    pb.ErrorDetail.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    pb.ErrorDetail.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    pb.ErrorDetail.MODEL_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
}


def abort(context: grpc.ServicerContext, reason: int, message: str, stale_units: list[int] | None = None,
          current_round: int = 0) -> None:
    """End the call with a status and a machine-readable ErrorDetail trailer."""
    detail = pb.ErrorDetail(reason=reason, stale_units=stale_units or [], current_round=current_round)
    context.set_trailing_metadata(((ERROR_DETAIL_KEY, detail.SerializeToString()),))
    context.abort(STATUS_OF_REASON[reason], message)


def metadata_value(context: grpc.ServicerContext, key: str) -> str | bytes | None:
    """The value of call metadata `key` (the first, if repeated); None if absent."""
    return next((value for name, value in context.invocation_metadata() or () if name == key), None)


def secret_matches(given: str | bytes | None, expected: bytes) -> bool:
    """Whether the caller's secret is the expected one, compared in constant time."""
    return isinstance(given, bytes) and hmac.compare_digest(given, expected)


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The Common Name of the caller's verified client certificate; None if it presented none."""
    names = context.auth_context().get(PEER_NAME_KEY)
    return names[0].decode(errors="replace") if names else None


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(self, coordinator: Coordinator, max_poll_seconds: float = 30.0,
                 check_peer_names: bool = False, join_token: bytes | None = None,
                 operator_token: bytes | None = None) -> None:
        self.coordinator = coordinator
        self.max_poll_seconds = max_poll_seconds
        # Mutual TLS: a caller may act only as the worker its certificate names, whatever tokens it holds.
        self.check_peer_names = check_peer_names
        # The enrollment secret a Join must carry (None: anyone who reaches the port may join).
        self.join_token = join_token
        # The secret that unlocks the state digest (None: nobody may have it).
        self.operator_token = operator_token
        self.running = LatestCalls()  # each worker's one poll and one upload
        # No legitimate layer is bigger than the model's largest at 8 bytes per value.
        self.max_tensor_bytes = max(math.prod(shape) for shape in coordinator.layer_shapes) * 8
        # Nor does an upload carry more than every layer and buffer once at that size.
        self.max_update_bytes = 8 * sum(math.prod(shape) for shape in (
            *coordinator.layer_shapes, *(shape for shape, _ in coordinator.rules.buffer_specs)))
        # And it lists each layer and each buffer at most once.
        self.upload_limits = UploadLimits(layers=len(coordinator.layer_shapes),
                                          buffers=len(coordinator.rules.buffer_specs))

    def _refuse_unauthenticated(self, context: grpc.ServicerContext, message: str) -> None:
        """End the call UNAUTHENTICATED; every such refusal is counted (metrics, the round's record)."""
        self.coordinator.record_refusal(UNAUTHENTICATED_WORKER, pb.ErrorDetail.UNAUTHENTICATED, 0)
        abort(context, pb.ErrorDetail.UNAUTHENTICATED, message)

    def _check_peer(self, worker_name: str, context: grpc.ServicerContext) -> None:
        if self.check_peer_names and (certified := peer_name(context)) != worker_name:
            log.warning("refused a call as worker %r from a client certified as %r", worker_name, certified)
            self._refuse_unauthenticated(
                context, f"the client certificate is for {certified!r}, not for worker {worker_name!r}")

    def _caller(self, context: grpc.ServicerContext) -> WorkerRecord:
        """The worker that the call metadata proves the caller to be: known before any message is read."""
        worker_id, token = metadata_value(context, WORKER_ID_KEY), metadata_value(context, WORKER_TOKEN_KEY)
        if not isinstance(worker_id, str) or not worker_id.isdecimal() or len(worker_id) > 10 \
                or not isinstance(token, bytes):
            self._refuse_unauthenticated(context, f"a worker call needs the call metadata {WORKER_ID_KEY} (the "
                                                  f"worker id from JoinReply, in decimal) and {WORKER_TOKEN_KEY} "
                                                  f"(its token)")
        try:
            record = self.coordinator.registry.authenticate(int(worker_id), token)
        except AuthError as error:
            self._refuse_unauthenticated(context, str(error))
        self._check_peer(record.name, context)
        return record

    def _check_body_names(self, record: WorkerRecord, worker_id: int, token: bytes, what: str,
                          context: grpc.ServicerContext) -> None:
        """The worker id and token inside a message must be the ones the call metadata proved."""
        if worker_id != record.worker_id or not hmac.compare_digest(token, record.token):
            self._refuse_unauthenticated(context, f"the {what} names worker {worker_id} or another token than the "
                                                  f"call metadata, which proves worker {record.worker_id}")

    def admit(self, method: str, context: grpc.ServicerContext) -> Callable[[], None]:
        """Run by CallGuard before a worker call's first message is read: the caller must be a joined worker,
        and its call becomes the one running call of this method for that worker (a newer one cancels it)."""
        record = self._caller(context)

        def superseded() -> None:
            log.info("worker %d started another %s: cancelling the one before", record.worker_id, method)
            context.cancel()

        return self.running.enter((record.worker_id, method), superseded)

    def _check_joiner(self, what: str, worker_name: str, protocol: str, context: grpc.ServicerContext) -> None:
        """What GetExperiment and Join both require: the join token, this protocol, a valid worker name and,
        with mutual TLS, a client certificate for that name."""
        if self.join_token is not None and not secret_matches(metadata_value(context, JOIN_TOKEN_KEY), self.join_token):
            log.warning("refused a %s from %s: no or a wrong join token", what, context.peer())
            self._refuse_unauthenticated(context, f"this server admits workers that send its join token in the "
                                                  f"{JOIN_TOKEN_KEY} call metadata; the token is missing or wrong")
        if protocol != PROTOCOL:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"server speaks {PROTOCOL}, worker asked for {protocol!r}")
        try:
            check_worker_name(worker_name)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        self._check_peer(worker_name, context)

    def GetExperiment(self, request: pb.ExperimentRequest, context: grpc.ServicerContext) -> pb.ExperimentSpec:
        self._check_joiner("request for the experiment", request.worker_name, request.protocol, context)
        return self.coordinator.experiment_spec()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self._check_joiner("join", request.worker_name, request.protocol, context)
        try:
            record, versions, last_accepted = self.coordinator.join(request.worker_name,
                                                                    specs_from_proto(request.model_tensors))
        except ModelRefused as error:
            log.warning("refused a join: %s", error)
            abort(context, pb.ErrorDetail.MODEL_MISMATCH, str(error))
        except FederationFull as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.JoinReply(
            worker_id=record.worker_id, token=record.token, shard_index=record.shard_index,
            experiment=self.coordinator.experiment_spec(),
            lbg_versions=[pb.UnitVersion(unit=u, version=v) for u, v in sorted(versions.items())],
            last_accepted_round=last_accepted,
        )

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskPart]:
        record = self._caller(context)
        self._check_body_names(record, request.worker_id, request.token, "TaskRequest", context)
        try:
            wait = poll_window(request.max_wait_seconds, self.max_poll_seconds)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        waiter = self.coordinator.poll_waiter()
        context.add_callback(lambda: self.coordinator.wake(waiter))  # a client hanging up ends the wait
        result = self.coordinator.wait_for_task(record.worker_id, wait, context.is_active, waiter)
        if not isinstance(result, RoundTaskSnapshot):
            part = pb.TaskPart(idle=pb.Idle()) if result is None else pb.TaskPart(finished=result)
            self.coordinator.count_downlink(record.worker_id, "control", wire_size(part))
            yield part
            return
        for index, (kind, part) in enumerate(result.parts(request)):
            size = wire_size(part)
            # What the whole model would cost instead is counted with the task, once per stream.
            equivalent = size + result.model_bytes if index == 0 else 0
            self.coordinator.count_downlink(record.worker_id, kind, size, equivalent)
            yield part

    def SubmitUpdate(self, request_iterator: Iterator[UploadMessage], context: grpc.ServicerContext) -> pb.UpdateAck:
        record = self._caller(context)
        stream = iter(request_iterator)
        try:
            update = read_update_header(stream)
        except MalformedStream as error:
            self.coordinator.record_refusal(record.worker_id, pb.ErrorDetail.MALFORMED, 0)
            abort(context, pb.ErrorDetail.MALFORMED, str(error))
        self._check_body_names(record, update.header.worker_id, update.header.token, "upload's header", context)
        try:
            read_update_body(update, stream, self.max_tensor_bytes, self.max_update_bytes, self.upload_limits)
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

    def SubmitEvaluation(self, request: pb.EvaluationReport, context: grpc.ServicerContext) -> pb.EvaluationAck:
        record = self._caller(context)
        self._check_body_names(record, request.worker_id, request.token, "EvaluationReport", context)
        try:
            self.coordinator.submit_evaluation(record.worker_id, request, wire_size(request))
        except UpdateRejected as error:
            log.warning("refused evaluation from worker %d for round %d: %s", record.worker_id, request.round, error)
            abort(context, error.reason, str(error), current_round=self.coordinator.status().round)
        return pb.EvaluationAck(round=request.round)

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        if request.include_state_digest:
            if self.operator_token is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              "the state digest is off: the server was started without an operator token "
                              "(--operator-token-file or LBGM_OPERATOR_TOKEN)")
            if not secret_matches(metadata_value(context, OPERATOR_TOKEN_KEY), self.operator_token):
                self._refuse_unauthenticated(context, f"the state digest needs the operator token in the "
                                                      f"{OPERATOR_TOKEN_KEY} call metadata; it is missing or wrong")
        return self.coordinator.status(request.include_state_digest)

