"""One virtual worker: its own channel, identity, data shard and LBG state.

It dials out to the aggregator, asks for the experiment (GetExperiment),
builds its model and joins with that model's description (the server refuses
a model that differs, before the worker takes a slot), then loops: long-poll
for a task, evaluate the task's model on the held-out data when the server
asks (federated evaluation), train locally, encode with LBGM, upload. Transport failures are retried with
exponential backoff and full jitter; a refused upload leaves the local LBGs
untouched (they are committed only once the server accepted the upload), and
a STALE_LBG refusal is answered by resending the named units in full. On
(re)join the worker returns its LBGM state to the last round the server holds
from it (see rollback.py), so a server that resumed from a checkpoint and a
worker never disagree about what was sent.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import torch

from lbgm.common.codec import torch_dtype
from lbgm.common.downlink import DownlinkError, Lookback, apply_delivery, model_digest
from lbgm.common.grpc_options import ERROR_DETAIL_KEY, JOIN_TOKEN_KEY, PROTOCOL, WORKER_CHANNEL_OPTIONS, worker_metadata
from lbgm.common.lookback import decision_units
from lbgm.common.model_spec import TensorSpec, describe_model, specs_to_proto
from lbgm.common.state_files import lbgs_from_state, lbgs_to_state, save_atomic
from lbgm.common.state_files import load as load_state
from lbgm.common.tls import ChannelTls, open_channel
from lbgm.common.wire import ReceivedTask, read_task, serialized_update_parts, submit_update_call
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.encoder import EncodedRound, LbgmEncoder, compressor_settings
from lbgm.worker.rollback import StateHistory, WorkerSnapshot
from lbgm.task import Shard, Task, TaskOptions
from lbgm.task.loader import BUILTIN_TASK, build_model, call_task, load_task
from lbgm.worker.trainer import LocalTrainer, local_seed

log = logging.getLogger(__name__)

T = TypeVar("T")
# Transient: the server is unreachable or busy (its control-call slots are full), a call outlived its deadline,
# or the server cancelled it (a stalled stage, a newer call of this worker) while this worker was not stopping.
# RESOURCE_EXHAUSTED is not among them: here it means a full federation or an oversized message, which persist.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
MAX_MODEL_TENSOR_BYTES = 1 << 31


class WorkerStopped(Exception):
    """The worker was asked to stop while waiting."""


class ServerUnreachable(ConnectionError):
    """The server stayed unreachable for longer than the retry policy allows."""


@dataclass(frozen=True)
class RetryPolicy:
    initial_seconds: float = 0.5
    max_seconds: float = 20.0
    give_up_seconds: float = 300.0


@dataclass(frozen=True)
class HeldModel:
    """The global model a worker holds in update mode of the downlink (CPU tensors as they arrived or
    were rebuilt), its version and digest: what its next TaskRequest claims."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    version: int
    digest: bytes


@dataclass
class WorkerStats:
    rounds: int = 0
    full_units: int = 0
    scalar_units: int = 0
    stale_resends: int = 0
    refused_rounds: int = 0


def error_detail(error: grpc.RpcError) -> pb.ErrorDetail | None:
    """The server's machine-readable reason for a refused call, if it sent one."""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return pb.ErrorDetail.FromString(value)
    return None


class ModelMismatch(RuntimeError):
    """The server refused this worker's join: its model differs from the server's."""


def task_options(spec: pb.ExperimentSpec) -> TaskOptions:
    """The options the server's task factory was given, as its ExperimentSpec carries them."""
    return TaskOptions(dataset=spec.dataset, model=spec.model, partition=spec.partition,
                       classes_per_worker=spec.classes_per_worker, dirichlet_alpha=spec.dirichlet_alpha,
                       eval_batch_size=spec.eval_batch_size)


class LocalJob(Protocol):
    """What a virtual worker trains each round: a task's training (LocalTrainer) or a user's own
    script (lbgm.client). The protocol below moves its updates; the job only trains."""

    model: torch.nn.Module  # its parameter order is the LBGM layer order

    @property
    def num_samples(self) -> int: ...  # the aggregation weight of this worker's updates

    def train(self, global_state: list[torch.Tensor], local_steps: int, batch_size: int, lr: float,
              round_number: int) -> tuple[list[torch.Tensor], float]: ...  # (update g per parameter, loss)

    def buffers(self) -> list[torch.Tensor]: ...  # after train(): the buffers to send (e.g. BatchNorm statistics)

    def position(self) -> Any: ...  # what restore() needs to redo a round on the same minibatches

    def restore(self, position: Any) -> None: ...

    # Optional: evaluate(global_state) -> lbgm.task.Evaluation | None, the global model's evaluation on the
    # worker's held-out data when the server asks (federated evaluation); without it, or when it returns
    # None, the worker reports that it has no held-out data.


class JobFactory(Protocol):
    """Makes a virtual worker's job from the server's experiment, in two steps: the description of the
    model the job trains (sent with the Join, so the server refuses a model that differs before the
    worker takes a slot), then, with the shard the join assigned, the job itself."""

    def model_tensors(self, spec: pb.ExperimentSpec) -> list[TensorSpec]: ...

    def __call__(self, spec: pb.ExperimentSpec, shard_index: int) -> LocalJob: ...


class TaskJobs:
    """Jobs that run the task `task` (a reference, lbgm.task.loader) on the worker's shard of the data
    under `data_dir`, with the options the server's experiment gives, training on `device`. One
    instance serves every virtual worker of a process: each job gets a model of its own (the one
    built to describe the model goes to the first job)."""

    def __init__(self, task: str, data_dir: str, device: torch.device = torch.device("cpu")) -> None:
        self.task = task
        self.data_dir = Path(data_dir) if data_dir else None
        self.device = device
        self._lock = threading.Lock()  # virtual workers join from their own threads
        self._tasks: dict[bytes, Task] = {}  # by experiment (its serialized ExperimentSpec)
        self._descriptions: dict[bytes, list[TensorSpec]] = {}
        self._unused: dict[bytes, torch.nn.Module] = {}  # a model built for a description, not yet in a job

    def _task(self, spec: pb.ExperimentSpec, experiment: bytes) -> Task:
        if experiment not in self._tasks:
            self._tasks[experiment] = load_task(self.task, task_options(spec))
        return self._tasks[experiment]

    def model_tensors(self, spec: pb.ExperimentSpec) -> list[TensorSpec]:
        experiment = spec.SerializeToString(deterministic=True)
        with self._lock:
            if experiment not in self._descriptions:
                model = build_model(self._task(spec, experiment), spec.seed, self.task)
                self._descriptions[experiment] = describe_model(model)
                self._unused[experiment] = model
            return self._descriptions[experiment]

    def __call__(self, spec: pb.ExperimentSpec, shard_index: int) -> LocalTrainer:
        experiment = spec.SerializeToString(deterministic=True)
        with self._lock:
            loaded = self._task(spec, experiment)
            model = self._unused.pop(experiment, None)
            if model is None:
                model = build_model(loaded, spec.seed, self.task)
        shard = Shard(shard_index, spec.num_shards, spec.seed, self.data_dir)
        data = call_task(self.task, "train_data", loaded.train_data, shard)
        evaluates = loaded.validation_data is not None and loaded.evaluate is not None
        validation = functools.partial(call_task, self.task, "validation_data", loaded.validation_data, shard) \
            if evaluates else None
        return LocalTrainer(loaded, model, data, seed=local_seed(spec.seed, shard_index), device=self.device,
                            validation=validation)


def task_job(task: str = BUILTIN_TASK, data_dir: str = "", device: torch.device = torch.device("cpu")) -> TaskJobs:
    return TaskJobs(task, data_dir, device)


class VirtualWorker:
    def __init__(self, name: str, target: str, job: JobFactory | None = None, poll_seconds: float = 20.0,
                 retry: RetryPolicy = RetryPolicy(), stop: threading.Event | None = None,
                 state_dir: Path | None = None, tls: ChannelTls | None = None,
                 training_slots: threading.Semaphore | None = None, join_token: bytes | None = None) -> None:
        self.name = name
        self.target = target
        self.make_job = job or task_job()  # built at the first join, from the server's experiment
        self.tls = tls  # with mutual TLS, a client certificate whose Common Name is `name`
        self.join_metadata = ((JOIN_TOKEN_KEY, join_token),) if join_token is not None else None
        self.training_slots = training_slots or threading.Semaphore(1)  # shared by a process's virtual workers
        self.poll_seconds = poll_seconds
        self.retry = retry
        self.stop = stop or threading.Event()
        # With a state dir the LBGs survive a restart: the worker re-joins and keeps sending scalars.
        self.state_path = state_dir / f"{name.replace('/', '_')}.lbg.pt" if state_dir else None
        self.stats = WorkerStats()
        self.worker_id = 0
        self.token = b""
        self.encoder: LbgmEncoder | None = None
        self.trainer: LocalJob | None = None
        self.history = StateHistory()
        self.model_description: list[TensorSpec] | None = None  # what this worker's Join says its model is
        self._evaluated_round = 0  # the last round whose evaluation the server took (since the last join)
        self._in_doubt: tuple[int, EncodedRound] | None = None  # the last upload not known to be accepted
        self._random = random.Random(name)
        # Downlink in update mode, in memory only (a restarted worker holds nothing and gets the whole model).
        self.held: HeldModel | None = None
        self.downlink_lookbacks: dict[int, Lookback] = {}

    # ------------------------------------------------------------ plumbing

    def _call(self, call: Callable[[], T], what: str) -> T:
        """call(), retrying transport failures with exponential backoff and full jitter."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                if self.stop.is_set():  # e.g. a call cancelled because this worker is stopping
                    raise WorkerStopped() from None
                if time.monotonic() - started > self.retry.give_up_seconds:
                    raise ServerUnreachable(
                        f"{self.name}: server {self.target} unreachable for {self.retry.give_up_seconds:.0f}s "
                        f"while trying to {what}: {error.details()}") from None
                ceiling = min(self.retry.max_seconds, self.retry.initial_seconds * 2 ** attempt)
                delay = self._random.uniform(0.1 * ceiling, ceiling)
                log.warning("%s: cannot %s (%s: %s); retrying in %.1fs", self.name, what, error.code().name,
                            error.details(), delay)
                attempt += 1
                if self.stop.wait(delay):
                    raise WorkerStopped() from None

    # ------------------------------------------------------------ protocol

    def model_tensors(self, spec: pb.ExperimentSpec) -> list[TensorSpec]:
        """The description of the model this worker trains for the server's experiment `spec`."""
        return self.make_job.model_tensors(spec)

    def join(self, stub: pb_grpc.AggregatorStub) -> None:
        """Join with this worker's model description (asking for the experiment first, once); a server
        whose model differs refuses the join, and ModelMismatch names every difference."""
        if self.model_description is None:
            spec = self._call(lambda: stub.GetExperiment(pb.ExperimentRequest(worker_name=self.name, protocol=PROTOCOL),
                                                         timeout=30, metadata=self.join_metadata),
                              "ask for the experiment")
            self.model_description = self.model_tensors(spec)
        request = pb.JoinRequest(worker_name=self.name, protocol=PROTOCOL,
                                 model_tensors=specs_to_proto(self.model_description))
        try:
            reply = self._call(lambda: stub.Join(request, timeout=30, metadata=self.join_metadata), "join")
        except grpc.RpcError as error:
            detail = error_detail(error)
            if detail is not None and detail.reason == pb.ErrorDetail.MODEL_MISMATCH:
                raise ModelMismatch(f"the server refused the join: {error.details()}") from None
            raise
        self.worker_id, self.token = reply.worker_id, reply.token
        self._evaluated_round = 0
        spec = reply.experiment
        if self.trainer is None:
            self.trainer = self.make_job(spec, reply.shard_index)
            self.encoder = LbgmEncoder(decision_units(len(list(self.trainer.model.parameters())), spec.granularity),
                                       seed=local_seed(spec.seed, reply.shard_index))
            if self.state_path is not None and self.state_path.exists():
                self.encoder.lbgs = lbgs_from_state(load_state(self.state_path))
        returned = self._return_to(reply.last_accepted_round)
        dropped = self.encoder.keep_matching({v.unit: v.version for v in reply.lbg_versions})
        if dropped:
            log.warning("%s: server does not hold my LBGs for units %s; they will go in full", self.name, dropped)
        if not returned:  # no record of that round: what is left now is the best state as of it
            self.history.restart_at(reply.last_accepted_round, self._snapshot())
        if self.state_path is not None:
            save_atomic(self.state_path, lbgs_to_state(self.encoder.lbgs))
        log.info("%s: joined as worker %d with shard %d (%d samples)", self.name, self.worker_id,
                 reply.shard_index, self.trainer.num_samples)

    def _snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(self.encoder.state(), self.trainer.position())

    def _return_to(self, last_accepted: int) -> bool:
        """Take the LBGM state to right after round `last_accepted`, the last the server holds from
        this worker; False if there is no record of that round (then memory and warm starts, which
        only make sense against what the server saw, are dropped)."""
        in_doubt, self._in_doubt = self._in_doubt, None
        if in_doubt is not None and in_doubt[0] == last_accepted:
            log.info("%s: my round %d upload counted although its acknowledgement was lost", self.name, last_accepted)
            self._accepted(in_doubt[1], last_accepted)
            return True
        recorded = self.history.rounds()
        snapshot = self.history.rewind(last_accepted)
        if snapshot is not None:
            if recorded[-1] != last_accepted:
                log.warning("%s: the server holds my uploads up to round %d only; returning my state to that round "
                            "(rounds %s are redone)", self.name, last_accepted,
                            [r for r in recorded if r > last_accepted])
            self.encoder.restore(snapshot.encoder)
            self.trainer.restore(snapshot.batches)
            return True
        state = self.encoder.state()
        if state.memory or state.warm_q:
            log.warning("%s: no record of my state after round %d, the last the server holds from me; dropping "
                        "my error-feedback memory and warm starts", self.name, last_accepted)
            self.encoder.restore(dataclasses.replace(state, memory={}, warm_q={}))
        return False

    def run(self) -> WorkerStats:
        with open_channel(self.target, self.tls, WORKER_CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AggregatorStub(channel)
            submit = submit_update_call(channel)
            self.join(stub)
            while not self.stop.is_set():
                request = self._task_request()
                try:
                    result = self._call(
                        lambda: read_task(stub.GetTask(request, timeout=self.poll_seconds + 30,
                                                       metadata=worker_metadata(self.worker_id, self.token)),
                                          MAX_MODEL_TENSOR_BYTES),
                        "poll for a task")
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                        raise
                    log.warning("%s: server no longer knows me (%s); re-joining", self.name, error.details())
                    self.join(stub)
                    continue
                if isinstance(result, pb.Finished):
                    log.info("%s: %s", self.name, result.reason)
                    break
                if result is not None:
                    model = self._global_model(result)
                    if model is None:
                        continue
                    result = dataclasses.replace(result, tensors=model, updates=[])
                    if result.task.evaluate or result.task.evaluate_only:
                        self.report_evaluation(stub, result)
                    if not result.task.evaluate_only:
                        self.run_round(submit, result)
        return self.stats

    def _task_request(self) -> pb.TaskRequest:
        """A poll for work, saying which global model and downlink look-backs this worker holds."""
        request = pb.TaskRequest(worker_id=self.worker_id, token=self.token, max_wait_seconds=self.poll_seconds)
        if self.held is not None:
            request.model_version, request.model_digest = self.held.version, self.held.digest
            request.downlink_versions.extend(pb.UnitVersion(unit=layer, version=lookback.version)
                                             for layer, lookback in sorted(self.downlink_lookbacks.items()))
        return request

    def _global_model(self, received: ReceivedTask) -> list[torch.Tensor] | None:
        """The task's global model (parameters, then buffers): as it came, or (update mode) rebuilt from
        the model held and checked against the task's digest. None when it cannot be rebuilt or its
        digest differs: then this worker holds nothing and asks again, never training on a wrong model."""
        task = received.task
        if not task.model_digest:
            return received.tensors
        if task.drop_lookbacks:
            log.warning("%s: the server could not verify the model I hold; dropping my downlink look-backs",
                        self.name)
            self.downlink_lookbacks = {}
        lookbacks = self.downlink_lookbacks
        parameters = sum(not spec.buffer for spec in self.model_description)
        try:
            if not task.model_updates:
                params, buffers = received.tensors[:parameters], received.tensors[parameters:]
            elif self.held is None or self.held.version != task.base_version:
                raise DownlinkError(f"updates from version {task.base_version}, I hold "
                                    f"{'none' if self.held is None else self.held.version}")
            else:
                params, lookbacks = apply_delivery(self.held.params, lookbacks, task.base_version, task.model_version,
                                                   received.updates)
                buffers = received.tensors
            digest = model_digest([*params, *buffers])
            if digest != task.model_digest:
                raise DownlinkError(f"digest {digest.hex()}, the task says {task.model_digest.hex()}")
        except DownlinkError as error:
            log.warning("%s: round %d: cannot rebuild global model version %d (%s); asking for the whole model",
                        self.name, task.round, task.model_version, error)
            self.held, self.downlink_lookbacks = None, {}
            return None
        self.held = HeldModel(list(params), list(buffers), task.model_version, digest)
        self.downlink_lookbacks = lookbacks
        log.info("%s: round %d: global model version %d, digest %s (%s)", self.name, task.round, task.model_version,
                 digest.hex(), f"updates from version {task.base_version}" if task.model_updates else "whole")
        return [*params, *buffers]

    def report_evaluation(self, stub: pb_grpc.AggregatorStub, received: ReceivedTask) -> None:
        """Evaluate the task's model on this worker's held-out data and report it (federated evaluation).
        A job without held-out data says so (num_samples 0); a refused report is logged, never fatal."""
        task = received.task
        if self._evaluated_round == task.round:
            return  # the same task again (its upload is being retried): the server holds the report
        evaluate = getattr(self.trainer, "evaluate", None)
        with self.training_slots:
            evaluation = evaluate(received.tensors) if evaluate is not None else None
        report = pb.EvaluationReport(worker_id=self.worker_id, token=self.token, round=task.round)
        if evaluation is not None:
            report.num_samples, report.loss, report.accuracy = evaluation.samples, evaluation.loss, evaluation.accuracy
            report.metrics.update({name: float(value) for name, value in evaluation.metrics.items()})
        try:
            self._call(lambda: stub.SubmitEvaluation(report, timeout=task.seconds_to_deadline + 30,
                                                     metadata=worker_metadata(self.worker_id, self.token)),
                       "report an evaluation")
        except grpc.RpcError as error:
            # Not again for this round: the same report would be refused again, poll after poll.
            log.warning("%s: round %d evaluation refused (%s): %s", self.name, task.round, error.code().name,
                        error.details())
        self._evaluated_round = task.round

    def run_round(self, submit: grpc.StreamUnaryMultiCallable, received: ReceivedTask) -> bool:
        """Train on the round's global model and upload the update; True if the server accepted it."""
        task = received.task
        settings = task.settings
        self.history.forget_before(task.checkpointed_round)
        with self.training_slots:  # the buffers too: virtual workers may share one model (bench/shared_model_task.py)
            gradient, loss = self.trainer.train(received.tensors, settings.local_steps, settings.batch_size,
                                                settings.local_lr, task.round)
            buffers = self.trainer.buffers()
        wire_dtype = torch_dtype(settings.wire_dtype)
        self.encoder.compressor = compressor_settings(settings)
        force_full: set[int] = set()
        header = pb.UpdateHeader(worker_id=self.worker_id, token=self.token, round=task.round,
                                 num_samples=self.trainer.num_samples, train_loss=loss)
        while True:
            encoded = self.encoder.encode(gradient, task.round, settings.delta, wire_dtype, force_full,
                                          settings.error_feedback)
            self._in_doubt = (task.round, encoded)
            try:
                self._call(lambda: submit(serialized_update_parts(header, encoded.full, encoded.scalars, buffers),
                                          timeout=task.seconds_to_deadline + 30,
                                          metadata=worker_metadata(self.worker_id, self.token)), "upload")
            except grpc.RpcError as error:
                detail = error_detail(error)
                reason = detail.reason if detail else pb.ErrorDetail.REASON_UNSPECIFIED
                if reason == pb.ErrorDetail.STALE_LBG and not force_full:
                    log.warning("%s: round %d: server lacks my LBGs for units %s; resending them in full",
                                self.name, task.round, list(detail.stale_units))
                    self.stats.stale_resends += 1
                    force_full = set(detail.stale_units)
                    continue
                if reason == pb.ErrorDetail.DUPLICATE:
                    # An earlier attempt of this very upload got through (its acknowledgement was lost).
                    self._accepted(encoded, task.round)
                    return True
                self.stats.refused_rounds += 1
                log.warning("%s: round %d upload refused (%s): %s", self.name, task.round, error.code().name,
                            error.details())
                return False
            self._accepted(encoded, task.round)
            return True

    def _accepted(self, encoded: EncodedRound, round_number: int) -> None:
        self._in_doubt = None
        self.encoder.commit(encoded)
        self.history.record(round_number, self._snapshot())
        if self.state_path is not None and encoded.new_lbgs:
            save_atomic(self.state_path, lbgs_to_state(self.encoder.lbgs))
        self.stats.rounds += 1
        self.stats.full_units += len(encoded.new_lbgs)
        self.stats.scalar_units += len(encoded.scalars)

