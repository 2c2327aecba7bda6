"""Round orchestration: the server's state machine.

The driver thread (`Coordinator.run`) waits for `min_workers`, then for each
round samples a fraction of the joined workers, opens the round, waits until
every sampled worker's upload is accepted or the deadline passes, closes the
round (later uploads are refused), aggregates what arrived with weights
renormalised over the participants, applies the server optimizer, evaluates
and records metrics. gRPC threads call `join`, `wait_for_task`, `submit`,
`submit_evaluation` and `status`; one lock guards all shared state (the
driver waits on one condition of it, each long poll on a condition of its own).

Evaluation is central (the task's test set, on the server) when the server has
the task's code and the task has test data, and federated when so configured
(federated_eval_every; by default whenever there is no central evaluation):
the workers sampled in round r evaluate the model they receive, the model
after round r - 1, before training, and after the last round an
evaluation-only round asks every joined worker to evaluate the final model,
so the last record (and the summary's final accuracy) describes the final
model. Each record says which model its test figures describe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.compressors import CODEC_OF, zero_payload
from lbgm.common.lookback import aggregation_weights, decision_units
from lbgm.common.model_spec import TensorSpec, fingerprint, model_differences, specs_to_proto
from lbgm.server.robust import GlobalModel, aggregate_round
from lbgm.common.state_files import content_digest, lbgs_to_state, save_atomic
from lbgm.common.wire import (
    EncodedTensor, FullLayer, ReceivedUpdate, task_part_kinds, task_parts, update_parts, wire_size,
)
from lbgm.server.checkpoint import CheckpointStore, CheckpointWriteError, ServerState
from lbgm.server.downlink import DownlinkRound, ServerDownlink, whole_model_bytes
from lbgm.server.accounting import RoundLedger, RunRecorder, resident_memory_bytes
from lbgm.server.evaluation import FederatedEvaluation, WorkerEvaluation, aggregate_evaluations, checked_report
from lbgm.server.job import load_server_job
from lbgm.server.sampling import sample_workers
from lbgm.server.metrics import ServerMetrics
from lbgm.server.mirrors import mirror_store
from lbgm.server.registry import Registry, WorkerRecord
from lbgm.server.updates import AcceptedUpdate, UpdateRejected, UploadRules, decode_full_layers, judge_update
from lbgm.v1 import lbgm_pb2 as pb

log = logging.getLogger(__name__)

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RoundTaskSnapshot:
    """What a sampled worker downloads: immutable, shared by all of the round's workers."""

    task: pb.RoundTask
    model: list[EncodedTensor]
    model_bytes: int = 0  # the whole model's parts on the wire (what a delta = 0 downlink sends after the task)
    downlink: DownlinkRound | None = None  # update mode: each worker gets the updates it lacks

    def parts(self, request: pb.TaskRequest) -> Iterator[tuple[str, pb.TaskPart]]:
        """The GetTask stream for the worker that sent `request`, each part with its byte-counter kind."""
        if self.downlink is None:
            return task_part_kinds(task_parts(self.task, self.model), "model")
        return self.downlink.parts(self.task, self.model, request)


@dataclass
class OpenRound:
    number: int
    sampled: frozenset[int]
    deadline: float  # time.monotonic()
    snapshot: RoundTaskSnapshot
    started: float
    accepted: dict[int, AcceptedUpdate] = field(default_factory=dict)
    equivalent_bytes: int = 0  # what the accepted uploads would have cost with delta = 0
    equivalent_downlink_bytes: int = 0  # what the downloads would have cost sending the whole model
    evaluations: dict[int, WorkerEvaluation] = field(default_factory=dict)

    @property
    def evaluate_only(self) -> bool:
        return self.snapshot.task.evaluate_only

    def waiting_for(self) -> frozenset[int]:
        """Sampled workers the round still waits for: their upload, or in an evaluation-only round
        their evaluation."""
        return self.sampled - (self.evaluations.keys() if self.evaluate_only else self.accepted.keys())


@dataclass(frozen=True)
class Evaluated:
    """The last evaluation of the global model, as `lbgm status` and Prometheus show it."""

    accuracy: float = math.nan
    loss: float = math.nan
    source: str = ""  # "central", "federated", "" (none yet)
    model_round: int = 0  # the model after this many rounds


class ModelRefused(ValueError):
    """A joining worker's model differs from the server's; nothing changed on the server."""


def upload_rules(config: ExperimentConfig, tensors: Sequence[TensorSpec]) -> UploadRules:
    """What every upload of this run must look like, from the model's tensor description alone."""
    parameters = [spec for spec in tensors if not spec.buffer]
    return UploadRules(
        layer_shapes=tuple(spec.shape for spec in parameters),
        units=tuple(decision_units(len(parameters), config.granularity)),
        dense_dtype=WIRE_DTYPES[config.wire_dtype],
        codec=CODEC_OF[config.compressor],
        buffer_specs=tuple((spec.shape, spec.torch_dtype) for spec in tensors if spec.buffer),
    )


class Coordinator:
    def __init__(self, config: ExperimentConfig, run_dir: Path, resume: bool = False,
                 eval_device: torch.device = torch.device("cpu"), mirrors: str = "memory") -> None:
        """A fresh run in `run_dir`, or (resume) the run continued from its last checkpoint there.
        The job (the task's model and data, or a weights file: lbgm.server.job) is loaded before
        anything in run_dir changes. `eval_device` runs the central evaluation; the global model and
        the mirrors stay on the CPU, the mirrors in RAM or on disk (`mirrors`: lbgm.server.mirrors)."""
        self.config = config
        self.job = load_server_job(config, eval_device)
        self._eval_period = config.federated_eval_period(self.job.evaluate is not None)
        self.checkpoints = CheckpointStore.of_run(run_dir)
        if not resume:
            self.checkpoints.clear()
        restored = self.checkpoints.load(config, tensors=mirrors == "memory") if resume else None
        self.params, self.buffers = self.job.initial.params, self.job.initial.buffers
        self.model_tensors = self.job.initial.tensors
        self.layer_shapes = [spec.shape for spec in self.job.initial.parameter_specs]
        self.units = decision_units(len(self.params), config.granularity)
        self.fingerprint = fingerprint(self.model_tensors)
        self.wire_dtype = WIRE_DTYPES[config.wire_dtype]
        self.velocity: list[torch.Tensor] | None = None
        self.rules = upload_rules(config, self.model_tensors)
        self.registry = Registry(config.workers)
        self.mirrors = mirror_store(mirrors, run_dir)
        self.recorder = RunRecorder(run_dir, restored.metrics if restored else None)
        self.metrics = ServerMetrics(self.status, self.mirrors.nbytes, config.round_timeout)
        self._present: set[int] = set()  # workers that joined this server process (sampling draws from these)
        self._resumed = restored is not None
        self._checkpointed = 0  # the round the last committed checkpoint holds
        self._last_accepted: dict[int, int] = {}  # worker id -> last round whose upload was accepted
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # the driver's waits: joins, answers, workers told
        # The long polls waiting now, each on its own condition of the same lock: a join, an upload or a poll
        # that ends wakes none of them (with thousands idle, waking them all each time was O(K) per event).
        self._polls: set[threading.Condition] = set()
        self._round: OpenRound | None = None
        self._ledger = RoundLedger()
        self._completed = 0
        self._finished = False
        self._told_finished: set[int] = set()
        self._central_eval = (math.nan, math.nan)  # (accuracy, loss) the round guard compares against
        self._last_eval = Evaluated()
        self._totals = {"uplink": 0, "downlink": 0}
        self._full_parts_bytes: dict[int, int] = {}
        self._equivalent_downlink = 0  # since the last round closed, see OpenRound.equivalent_downlink_bytes
        self._started = time.monotonic()
        if restored is not None:
            self._restore(restored)
        self.downlink = ServerDownlink(config, self.params, self.buffers, self._completed,
                                       restored.downlink if restored else None) if config.downlink_updates else None
        self._write_partition_summary()

    def _restore(self, state: ServerState) -> None:
        self.params, self.buffers, self.velocity = state.params, state.buffers, state.velocity
        self.registry.restore(state.workers)
        for worker_id, entries in state.mirrors.items():
            self.mirrors.restore(worker_id, entries)
        self._completed = self._checkpointed = state.completed_rounds
        self._last_accepted = dict(state.last_accepted)
        self._totals = dict(state.totals)
        self._started -= state.elapsed_seconds
        if state.metrics and self.job.evaluate is not None:
            self._central_eval = (state.metrics[-1]["test_accuracy"], state.metrics[-1]["test_loss"])
        evaluated = [r for r in state.metrics if r.get("test_source")]
        if evaluated:
            last = evaluated[-1]
            self._last_eval = Evaluated(last["test_accuracy"], last["test_loss"], last["test_source"],
                                        last["test_model_round"])
        log.info("resumed from %s after round %d: %d workers registered (they re-join by themselves), "
                 "%d LBG mirror entries", self.checkpoints.directory, self._completed, len(state.workers),
                 sum(len(entries) for entries in state.mirrors.values()))

    def _checkpoint(self) -> None:
        """Persist the state after a completed round (the driver thread is the only writer then).

        A failed write (a full disk) stops the run: the previous checkpoint is intact and `--resume`
        continues from it, while going on would lose more rounds at the next crash without a word.
        """
        with self._cond:
            last_accepted = dict(self._last_accepted)
        state = ServerState(
            completed_rounds=self._completed, params=self.params, buffers=self.buffers, velocity=self.velocity,
            workers=self.registry.slots(),
            mirrors={w: self.mirrors.for_checkpoint(w) for w in self.registry.ids()},
            last_accepted=last_accepted, metrics=self.recorder.records, totals=dict(self._totals),
            elapsed_seconds=time.monotonic() - self._started,
            downlink=self.downlink.to_dict() if self.downlink else None,
        )
        started = time.monotonic()
        try:
            written = self.checkpoints.save(state, self.config)
        except OSError as error:
            held = f"the checkpoint after round {self._checkpointed}" if self._checkpointed else "no checkpoint"
            raise CheckpointWriteError(f"cannot write the checkpoint after round {self._completed}: {error}; "
                                       f"{held} is intact on disk (resume with --resume once the cause is fixed)"
                                       ) from None
        self._checkpointed = self._completed
        log.debug("checkpoint after round %d: %d new LBG bytes in %.2fs", self._completed, written,
                  time.monotonic() - started)

    def _write_partition_summary(self) -> None:
        """partition.txt: what each worker's shard holds (workers compute the same split), or that the
        server has no data."""
        summary = self.job.partition
        (self.recorder.run_dir / "partition.txt").write_text(summary + "\n")
        log.info("data partition (worker index = shard = worker id - 1):\n%s", summary)

    # ---------------------------------------------------------- worker side

    def join(self, name: str, model_tensors: Sequence[TensorSpec]) -> tuple[WorkerRecord, dict[int, int], int]:
        """(record, LBG versions held, last round whose upload from this worker the server's state holds):
        a re-joining worker returns its LBGM state to what it was right after that round.
        ModelRefused, before anything changes, if the worker's model is not the server's."""
        differences = model_differences(self.model_tensors, model_tensors, limit=20)
        if differences:
            raise ModelRefused(f"worker {name}'s model differs from the server's ({self.job.source}): "
                               f"{'; '.join(differences)}")
        record, rejoined = self.registry.join(name)
        self.metrics.heard_from(record.worker_id)
        versions = self.mirrors.versions(record.worker_id)
        log.info("%s %s as worker %d (shard %d)", name, "re-joined" if rejoined else "joined", record.worker_id, record.shard_index)
        with self._cond:
            self._present.add(record.worker_id)
            self._cond.notify_all()
            return record, versions, self._last_accepted.get(record.worker_id, 0)

    def experiment_spec(self) -> pb.ExperimentSpec:
        c = self.config
        return pb.ExperimentSpec(
            dataset=c.dataset, model=c.model, partition=c.partition, classes_per_worker=c.classes_per_worker,
            dirichlet_alpha=c.dirichlet_alpha, num_shards=c.workers, seed=c.seed, granularity=c.granularity,
            model_fingerprint=self.fingerprint, task=self.job.task, eval_batch_size=c.eval_batch_size,
            model_tensors=specs_to_proto(self.model_tensors),
        )

    def poll_waiter(self) -> threading.Condition:
        """What one long poll waits on (give it to wait_for_task, and to wake when its caller hangs up)."""
        return threading.Condition(self._lock)

    def wait_for_task(self, worker_id: int, max_wait: float, active: Callable[[], bool] = lambda: True,
                      waiter: threading.Condition | None = None) -> RoundTaskSnapshot | pb.Finished | None:
        """The round task for this worker, Finished, or None after max_wait seconds or once `active()`
        turns false (the caller hung up: call `wake(waiter)` then, so the wait notices). The wait is woken
        when a round opens or training finishes, and by `wake`."""
        end = time.monotonic() + max_wait
        waiter = waiter or self.poll_waiter()
        self.metrics.heard_from(worker_id)
        with self._cond:
            self._polls.add(waiter)
            try:
                while active():
                    if self._finished:
                        self._told_finished.add(worker_id)
                        self._cond.notify_all()
                        return pb.Finished(reason=f"training finished after {self._completed} rounds")
                    current = self._round
                    if current and worker_id in current.waiting_for():
                        return current.snapshot
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        return None
                    waiter.wait(remaining)
                return None
            finally:
                self._polls.discard(waiter)

    def wake(self, waiter: threading.Condition) -> None:
        """Make the long poll waiting on `waiter` check again whether its caller is still there."""
        with self._cond:
            waiter.notify()

    def _wake_polls(self) -> None:
        """Every waiting long poll looks again (a round opened, or training finished); under the lock."""
        for waiter in self._polls:
            waiter.notify()

    def count_downlink(self, worker_id: int, kind: str, count: int, equivalent: int | None = None) -> None:
        """`count` bytes sent to a worker; `equivalent`: what a downlink sending the whole model would
        have sent instead (default: the same)."""
        with self._cond:
            self._equivalent_downlink += count if equivalent is None else equivalent
            self._ledger.add_downlink(worker_id, kind, count)
            self._totals["downlink"] += count
            self.metrics.downlink(kind, count)

    def submit(self, worker_id: int, update: ReceivedUpdate) -> AcceptedUpdate:
        """Accept one upload atomically, or raise UpdateRejected and change nothing but the byte counters."""
        self.metrics.heard_from(worker_id)
        try:  # the payloads need no state: decoded and checked outside the lock, by all uploads at once
            decoded = decode_full_layers(update, update.header.round, self.rules)
        except UpdateRejected as error:
            self.record_refusal(worker_id, error.reason, update.wire_bytes)
            raise
        with self._cond:
            try:
                accepted = self._judge(worker_id, update, decoded)
            except UpdateRejected as error:
                self._count_refusal(worker_id, error.reason, update.wire_bytes)
                raise
            self._ledger.add_uplink(worker_id, update.bytes_by_kind)
            self._totals["uplink"] += update.wire_bytes
            self.metrics.accepted(update.bytes_by_kind, accepted.scalar_units, accepted.full_units)
            current = self._round
            self.mirrors.replace(worker_id, accepted.new_mirrors)
            current.accepted[worker_id] = accepted
            self._last_accepted[worker_id] = current.number
            current.equivalent_bytes += (update.bytes_by_kind["header"] + update.bytes_by_kind.get("buffer", 0)
                                         + self._all_full_bytes(current.number))
            if not current.waiting_for():
                self._cond.notify_all()
            return accepted

    def submit_evaluation(self, worker_id: int, report: pb.EvaluationReport, wire_bytes: int) -> None:
        """Take a worker's evaluation of the open round's model, or raise UpdateRejected and change
        nothing but the byte counters. A repeated report of the same round is acknowledged and ignored."""
        self.metrics.heard_from(worker_id)
        with self._cond:
            current = self._round
            try:
                if current is None or report.round != current.number:
                    now = current.number if current else self._completed
                    raise UpdateRejected(pb.ErrorDetail.ROUND_CLOSED,
                                         f"round {report.round} is not open (current round: {now})")
                if not (current.snapshot.task.evaluate or current.evaluate_only):
                    raise UpdateRejected(pb.ErrorDetail.MALFORMED, f"round {report.round} asks for no evaluation")
                if worker_id not in current.sampled:
                    raise UpdateRejected(pb.ErrorDetail.NOT_SAMPLED,
                                         f"worker {worker_id} was not sampled in round {report.round}")
                evaluation = checked_report(report, self.config.max_worker_samples)
            except UpdateRejected as error:
                self._count_refusal(worker_id, error.reason, wire_bytes)
                raise
            kinds = {"evaluation": wire_bytes}
            self._ledger.add_uplink(worker_id, kinds)
            self._totals["uplink"] += wire_bytes
            self.metrics.accepted(kinds, 0, 0)
            current.equivalent_bytes += wire_bytes  # a delta = 0 run evaluates alike
            current.evaluations.setdefault(worker_id, evaluation)
            if not current.waiting_for():
                self._cond.notify_all()

    def record_refusal(self, worker_id: int, reason: int, wire_bytes: int) -> None:
        """Count an upload refused before it reached `submit` (bad stream, bad token)."""
        with self._cond:
            self._count_refusal(worker_id, reason, wire_bytes)

    def _count_refusal(self, worker_id: int, reason: int, wire_bytes: int) -> None:
        """Refused bytes still crossed the wire: they count, under their own kind."""
        self._ledger.add_uplink(worker_id, {"refused": wire_bytes})
        self._totals["uplink"] += wire_bytes
        self._ledger.refused[pb.ErrorDetail.Reason.Name(reason)] += 1
        self.metrics.refused(reason, wire_bytes)

    def _judge(self, worker_id: int, update: ReceivedUpdate, decoded: dict[int, torch.Tensor]) -> AcceptedUpdate:
        current = self._round
        claimed = update.header.round
        # Before ROUND_CLOSED: the retry of a round's last upload whose ack was lost finds the round
        # closed, and must learn that its upload counted (the worker then commits its LBGM state).
        if self._last_accepted.get(worker_id) == claimed:
            raise UpdateRejected(pb.ErrorDetail.DUPLICATE, f"worker {worker_id} already submitted round {claimed}")
        if current is None or claimed != current.number:
            now = current.number if current else self._completed
            raise UpdateRejected(pb.ErrorDetail.ROUND_CLOSED, f"round {claimed} is not open (current round: {now})")
        if worker_id not in current.sampled:
            raise UpdateRejected(pb.ErrorDetail.NOT_SAMPLED, f"worker {worker_id} was not sampled in round {claimed}")
        if current.evaluate_only:
            raise UpdateRejected(pb.ErrorDetail.ROUND_CLOSED, f"round {claimed} only evaluates the final model")
        accepted = judge_update(update, current.number, self.rules, self.mirrors.of_worker(worker_id), decoded)
        # The aggregation weight: a worker claiming more samples than its shard holds would dominate the average.
        # Without the data (a weights file) the server knows no shard's size: the claim is bounded instead.
        if self.job.shard_sizes is not None:
            shard_size = self.job.shard_sizes[self.registry.shard_of(worker_id)]
            if accepted.num_samples != shard_size:
                raise UpdateRejected(pb.ErrorDetail.MALFORMED, f"num_samples is {accepted.num_samples}, but worker "
                                                               f"{worker_id}'s shard holds {shard_size} samples")
        elif accepted.num_samples > self.config.max_worker_samples:
            raise UpdateRejected(pb.ErrorDetail.MALFORMED, f"num_samples is {accepted.num_samples}, more than "
                                                           f"max_worker_samples ({self.config.max_worker_samples})")
        return accepted

    def _all_full_bytes(self, round_number: int) -> int:
        """Serialized size of every layer sent in full (the delta = 0 upload), header excluded."""
        key = max(1, (round_number.bit_length() + 6) // 7)  # sizes depend only on the version's varint length
        if key not in self._full_parts_bytes:
            layers = [
                FullLayer(i, round_number, *zero_payload(self.config.compressor_settings, shape, self.wire_dtype))
                for i, shape in enumerate(self.layer_shapes)
            ]
            parts = update_parts(pb.UpdateHeader(), layers, [])
            next(parts)
            self._full_parts_bytes[key] = sum(wire_size(part) for part in parts)
        return self._full_parts_bytes[key]

    def status(self, include_digest: bool = False) -> pb.StatusReply:
        with self._cond:
            current = self._round.number if self._round else self._completed
            evaluated = self._last_eval
            return pb.StatusReply(
                round=min(current, self.config.rounds), total_rounds=self.config.rounds,
                workers_joined=len(self.registry), test_accuracy=evaluated.accuracy, test_loss=evaluated.loss,
                evaluation=evaluated.source, evaluated_model_round=evaluated.model_round,
                uplink_bytes=self._totals["uplink"], downlink_bytes=self._totals["downlink"],
                finished=self._finished, completed_rounds=self._completed,
                state_digest=self._state_digest() if include_digest else "",
            )

    def _state_digest(self) -> str:
        """Hash of everything an upload may change (caller holds the lock); byte counters excluded.
        Costs one pass over the model: the mirrors' part hashes each LBG once while it is installed."""
        digest = hashlib.sha256()
        open_round = self._round
        digest.update(repr((self._completed, open_round.number if open_round else 0,
                            sorted(open_round.accepted) if open_round else [])).encode())
        digest.update(content_digest([*self.params, *self.buffers, *(self.velocity or ())]).encode())
        digest.update(self.mirrors.digest())
        return digest.hexdigest()

    # ---------------------------------------------------------- driver

    def run(self) -> dict:
        """Run every round; returns the summary written to summary.json."""
        already_finished = self._completed >= self.config.rounds
        if already_finished:
            log.info("the run had already finished: %d of %d rounds completed, nothing left to train",
                     self._completed, self.config.rounds)
        else:
            self._wait_for_workers()
        for number in range(self._completed + 1, self.config.rounds + 1):
            self._run_round(number)
            every = self.config.checkpoint_every
            if every and (number % every == 0 or number == self.config.rounds):
                self._checkpoint()
        self._save_final_state()
        with self._cond:
            self._finished = True
            self._wake_polls()
        summary = self.recorder.write_summary({
            "wall_seconds": time.monotonic() - self._started,
            "mirror_bytes": self.mirrors.nbytes(),
            "config": dataclasses.asdict(self.config),
        })
        log.info("finished %d rounds: accuracy %.4f, uplink %d bytes (%.1f%% saved vs delta=0)",
                 summary["rounds_completed"], summary["final_accuracy"], summary["uplink_bytes"],
                 100 * summary["uplink_savings"])
        if already_finished:  # the crash may have come before the workers heard it: tell those that re-join
            self.wait_until_workers_told(self.config.round_timeout, everyone=True)
        return summary

    def _save_final_state(self) -> None:
        """final_model.pt (parameters and buffers) and mirrors.pt (every worker's LBGs, by worker name)."""
        run_dir = self.recorder.run_dir
        save_atomic(run_dir / "final_model.pt", {"params": self.params, "buffers": self.buffers})
        names = {worker_id: self.registry.name_of(worker_id) for worker_id in self.registry.ids()}
        save_atomic(run_dir / "mirrors.pt", {names[w]: lbgs_to_state(self.mirrors.of_worker(w)) for w in names},
                    in_memory=self.mirrors.in_ram)  # disk mirrors stream from their mappings

    def wait_until_workers_told(self, timeout: float, everyone: bool = False) -> None:
        """After the last round, give the workers of this process (or every registered one) at most
        `timeout` seconds to hear that training finished."""
        end = time.monotonic() + timeout
        with self._cond:
            while (set(self.registry.ids()) if everyone else self._present) - self._told_finished \
                    and time.monotonic() < end:
                self._cond.wait(max(0.0, end - time.monotonic()))

    def _wait_for_workers(self) -> None:
        """Wait until min_workers joined this process. A resumed run waits for them at most
        round_timeout, then goes on with those present (at least one): a worker of the crashed
        run may be gone for good, and a fresh run's rounds also go on without a missing worker."""
        needed = self.config.effective_min_workers
        give_up = time.monotonic() + self.config.round_timeout if self._resumed else math.inf
        with self._cond:
            while len(self._present) < needed:
                remaining = give_up - time.monotonic()
                if remaining <= 0 and self._present:
                    log.warning("resuming with %d of %d workers: the others did not re-join within round_timeout "
                                "(%.0fs)", len(self._present), needed, self.config.round_timeout)
                    return
                log.info("waiting for workers: %d of %d joined", len(self._present), needed)
                self._cond.wait(min(10.0, remaining) if remaining > 0 else 10.0)

    def _model_before_round(self) -> GlobalModel:
        """The global model with its central test figures, which the round guard compares against
        (evaluated here only before the first round, when no round has measured it)."""
        accuracy, loss = self._central_eval
        if not math.isfinite(loss) and self.job.evaluate is not None:
            accuracy, loss = self.job.evaluate(self.params, self.buffers)
        return GlobalModel(self.params, self.velocity, self.buffers, accuracy, loss)

    def _open_round(self, number: int, sampled: frozenset[int], task: pb.RoundTask) -> tuple[OpenRound, RoundLedger]:
        """Open a round for the current model, wait until every sampled worker answered or the deadline
        passed, close it; returns the closed round and its byte ledger."""
        model = [EncodedTensor.of(t) for t in (*self.params, *self.buffers)]
        downlink = self.downlink.round_view(model[len(self.params):], len(self.params)) if self.downlink else None
        snapshot = RoundTaskSnapshot(task, model, whole_model_bytes(task, model), downlink)
        started = time.monotonic()
        with self._cond:
            self._round = OpenRound(number, sampled, started + self.config.round_timeout, snapshot, started)
            self._wake_polls()
            while self._round.waiting_for() and time.monotonic() < self._round.deadline:
                self._cond.wait(self._round.deadline - time.monotonic())
            closed, self._round = self._round, None
            ledger, self._ledger = self._ledger, RoundLedger()
            closed.equivalent_downlink_bytes, self._equivalent_downlink = self._equivalent_downlink, 0
        return closed, ledger

    def _round_task(self, number: int, **flags: bool) -> pb.RoundTask:
        c = self.config
        settings = pb.TrainSettings(
            local_steps=c.local_steps, batch_size=c.batch_size, local_lr=c.local_lr, delta=c.delta,
            wire_dtype=pb.DType.Value(c.wire_dtype.upper()), error_feedback=c.error_feedback,
            codec=self.rules.codec, topk_fraction=c.topk_fraction, quantization_levels=c.quantization_levels,
            lowrank_rank=c.lowrank_rank, compressor_memory=c.compressor_memory,
        )
        return pb.RoundTask(round=number, total_rounds=c.rounds, settings=settings,
                            num_tensors=len(self.params) + len(self.buffers), seconds_to_deadline=c.round_timeout,
                            checkpointed_round=self._checkpointed if c.checkpoint_every else number - 1, **flags)

    def _federated(self, closed: OpenRound, model_round: int) -> FederatedEvaluation | None:
        """The average of the closed round's evaluation reports (None if it asked for none)."""
        task = closed.snapshot.task
        if not (task.evaluate or task.evaluate_only):
            return None
        result = aggregate_evaluations(model_round, [closed.evaluations[w] for w in sorted(closed.evaluations)])
        log.info("federated evaluation of the model after round %d: loss %.4f, accuracy %.4f over %d samples of "
                 "%d workers (%d of %d asked reported)", model_round, result.loss, result.accuracy,
                 result.num_samples, result.workers, len(closed.evaluations), len(closed.sampled))
        return result

    def _final_evaluation(self, number: int) -> tuple[FederatedEvaluation, OpenRound, RoundLedger]:
        """After the last training round: every joined worker evaluates the final model."""
        with self._cond:
            present = frozenset(self._present)
        closed, ledger = self._open_round(number + 1, present, self._round_task(number + 1, evaluate_only=True))
        return self._federated(closed, number), closed, ledger

    def _run_round(self, number: int) -> None:
        c = self.config
        with self._cond:
            present = sorted(self._present)
        sampled = frozenset(sample_workers(present, c.fraction, c.seed, number))
        period = self._eval_period
        # The final model is evaluated by an evaluation-only round instead of the next round's workers.
        evaluate = bool(period) and number < c.rounds and (number - 1) % period == 0
        started = time.monotonic()
        closed, ledger = self._open_round(number, sampled, self._round_task(number, evaluate=evaluate))
        federated = self._federated(closed, number - 1)
        participants = sorted(closed.accepted)
        previous = self._model_before_round()
        outcome = None
        if participants:
            updates = [closed.accepted[w] for w in participants]
            outcome = aggregate_round(previous, [u.gradient for u in updates], [u.buffers for u in updates],
                                      [u.num_samples for u in updates], c.robust_rule, c.effective_server_lr,
                                      c.server_momentum, self.job.evaluate)
            if outcome.refusal:
                log.warning("round %d discarded, the previous model is kept: %s", number, outcome.refusal)
            kept = outcome.model
            self.params, self.velocity, self.buffers = kept.params, kept.velocity, kept.buffers
            central = (kept.accuracy, kept.loss)
            weights = aggregation_weights([u.num_samples for u in updates])
            train_loss = float(sum(w * u.train_loss for w, u in zip(weights, updates)))
        else:
            log.warning("round %d: no update arrived before the deadline; model unchanged", number)
            central = (previous.accuracy, previous.loss)
            train_loss = math.nan
        broadcast = None
        if self.downlink is not None:  # the model the workers can rebuild becomes the global model
            changed = bool(participants) and not outcome.refusal
            self.params, broadcast = self.downlink.step(number, previous.params, self.params if changed else None,
                                                        self.buffers)
            if changed and self.job.evaluate is not None:
                central = self.job.evaluate(self.params, self.buffers)
        equivalent_bytes = closed.equivalent_bytes
        equivalent_downlink = closed.equivalent_downlink_bytes
        if period and number == c.rounds:
            federated, final, final_ledger = self._final_evaluation(number)
            ledger.merge(final_ledger)
            equivalent_bytes += final.equivalent_bytes
            equivalent_downlink += final.equivalent_downlink_bytes
        if self.job.evaluate is not None:
            evaluated = Evaluated(*central, "central", number)
        elif federated is not None:
            evaluated = Evaluated(federated.accuracy, federated.loss, "federated", federated.model_round)
        else:
            evaluated = None
        with self._cond:
            self._completed = number
            self._central_eval = central
            if evaluated is not None:
                self._last_eval = evaluated
        missing = sorted(sampled - set(participants))
        if missing:
            log.warning("round %d closed without workers %s", number, missing)
        accuracy, loss = (evaluated.accuracy, evaluated.loss) if evaluated else (math.nan, math.nan)
        record = {
            "round": number,
            "sampled": sorted(sampled),
            "participants": participants,
            "missing": missing,
            "test_accuracy": accuracy,
            "test_loss": loss,
            # Where the test figures come from ("central", "federated"; null: none this round) and which
            # model they describe (the global model after this many rounds).
            "test_source": evaluated.source if evaluated else None,
            "test_model_round": evaluated.model_round if evaluated else None,
            "federated_evaluation": federated.as_record() if federated else None,
            "train_loss": train_loss,
            "samples_by_worker": {str(w): closed.accepted[w].num_samples for w in participants},
            **ledger.as_record(),
            "full_equivalent_uplink_bytes": equivalent_bytes,
            "full_equivalent_downlink_bytes": equivalent_downlink,
            # The round's global update: layers broadcast in full and as scalars (once, not per worker).
            "downlink_full_units": broadcast.full_units if broadcast else len(self.params),
            "downlink_scalar_units": broadcast.scalar_units if broadcast else 0,
            # The global model after this round (update mode: what the workers check theirs against).
            "model_digest": self.downlink.digest_hex() if self.downlink else None,
            "floats_uploaded": sum(u.floats_uploaded for u in closed.accepted.values()),
            "full_equivalent_floats": len(participants) * sum(p.numel() for p in self.params),
            "full_units": sum(u.full_units for u in closed.accepted.values()),
            "scalar_units": sum(u.scalar_units for u in closed.accepted.values()),
            "clipped_updates": outcome.clipped_updates if outcome else 0,
            "clipped_layers": outcome.clipped_layers if outcome else 0,
            "round_discarded": bool(outcome and outcome.refusal),
            "candidate_test_loss": outcome.candidate_loss if outcome else math.nan,
            "round_seconds": time.monotonic() - started,
            "elapsed_seconds": time.monotonic() - self._started,
            "server_rss_bytes": resident_memory_bytes(),
            "mirror_bytes": self.mirrors.nbytes(),
        }
        self.metrics.round_recorded(record)  # before the record is written: a reader of both sees counters >= records
        self.recorder.add_round(record)
        log.info("round %d/%d: accuracy %.4f loss %.4f, %d/%d workers, %d scalar / %d full units, uplink %d B",
                 number, c.rounds, accuracy, loss, len(participants), len(sampled), record["scalar_units"],
                 record["full_units"], record["uplink_bytes"])
