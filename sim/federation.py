"""The federation without the network: same trainer, encoder, judge and
aggregation as the gRPC system, called directly.

Worker k here is the gRPC system's worker id k (shard k-1, the same local
seed), and rounds sample ids with the same generator, so for the same config
both produce the same global model up to float round-off. Tests and
benchmarks use this as the reference for the distributed system.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.model_spec import describe_model
from lbgm.server.robust import GlobalModel, aggregate_round
from lbgm.common.wire import ReceivedUpdate
from lbgm.server.evaluation import load_state
from lbgm.server.mirrors import MirrorStore
from lbgm.server.downlink import ServerDownlink
from lbgm.server.job import shard_data
from lbgm.server.rounds import WIRE_DTYPES, upload_rules
from lbgm.server.sampling import sample_workers
from lbgm.server.updates import judge_update
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.task.loader import build_model, load_task
from lbgm.worker.encoder import LbgmEncoder
from lbgm.worker.trainer import LocalTrainer, local_seed


@dataclass
class SimulatedWorker:
    worker_id: int
    trainer: LocalTrainer
    encoder: LbgmEncoder


@dataclass
class SimulationResult:
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    mirrors: MirrorStore
    workers: dict[int, SimulatedWorker]
    rounds: list[dict] = field(default_factory=list)
    downlink: ServerDownlink | None = None  # in update mode: the server's downlink state at the end


@dataclass(frozen=True)
class RoundGradients:
    """What one round produced, for analyses of the gradients themselves (lbgm analyze-gradients --federated)."""

    number: int
    gradients: dict[int, list[torch.Tensor]]  # each sampled worker's update before its encoder: its true gradient
    num_samples: dict[int, int]
    before: list[torch.Tensor]  # the global parameters the round started from
    after: list[torch.Tensor]  # and those it ended with


def simulate(config: ExperimentConfig, evaluate_every_round: bool = True,
             downlink_type: type[ServerDownlink] = ServerDownlink,
             observe: Callable[[RoundGradients], None] | None = None) -> SimulationResult:
    """Run the whole federation in this process. The server's round rule (lbgm.server.robust) evaluates
    every round; `evaluate_every_round` says whether every record carries test figures, or only the last.
    `downlink_type` lets a benchmark watch the downlink's decisions (bench.downlink_decisions);
    `observe` is called after every round with its workers' true gradients and the global model's move."""
    task = load_task(config.task, config.task_options)
    model = build_model(task, config.seed, config.task)
    test = task.test_data(config.data_path) if task.test_data is not None and task.evaluate is not None else None
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    rules = upload_rules(config, describe_model(model))
    wire_dtype = WIRE_DTYPES[config.wire_dtype]
    workers = {
        shard + 1: SimulatedWorker(
            worker_id=shard + 1,
            trainer=LocalTrainer(task, build_model(task, config.seed, config.task), data,
                                 seed=local_seed(config.seed, shard)),
            encoder=LbgmEncoder(rules.units, config.compressor_settings, seed=local_seed(config.seed, shard)),
        )
        for shard, data in enumerate(shard_data(task, config))
    }
    mirrors = MirrorStore()
    result = SimulationResult(params=params, buffers=buffers, mirrors=mirrors, workers=workers)

    def evaluate_model(params: list[torch.Tensor], buffers: list[torch.Tensor]) -> tuple[float, float]:
        load_state(model, params, buffers)
        result = task.evaluate(model, test)
        return float(result.accuracy), float(result.loss)

    evaluator = evaluate_model if test is not None else None
    figures = evaluate_model(params, buffers) if evaluator else (float("nan"), float("nan"))
    current = GlobalModel(params, None, buffers, *figures)
    # The downlink in update mode: the global model is what the workers rebuild from the broadcasts.
    downlink = downlink_type(config, params, buffers, 0) if config.downlink_updates else None
    result.downlink = downlink
    ids = sorted(workers)
    for number in range(1, config.rounds + 1):
        started = time.monotonic()
        sampled = sample_workers(ids, config.fraction, config.seed, number)
        accepted = []
        true_gradients = {}
        for worker_id in sampled:
            worker = workers[worker_id]
            gradient, loss = worker.trainer.train([*result.params, *result.buffers], config.local_steps,
                                                  config.batch_size, config.local_lr, number)
            if observe is not None:
                true_gradients[worker_id] = gradient
            encoded = worker.encoder.encode(gradient, number, config.delta, wire_dtype,
                                            error_feedback=config.error_feedback)
            update = ReceivedUpdate(
                header=pb.UpdateHeader(worker_id=worker_id, round=number, num_samples=worker.trainer.num_samples,
                                       train_loss=loss),
                full=encoded.full, scalars=encoded.scalars, buffers=dict(enumerate(worker.trainer.buffers())))
            verdict = judge_update(update, number, rules, mirrors.of_worker(worker_id))
            mirrors.replace(worker_id, verdict.new_mirrors)
            worker.encoder.commit(encoded)
            accepted.append(verdict)
        outcome = aggregate_round(current, [a.gradient for a in accepted], [a.buffers for a in accepted],
                                  [a.num_samples for a in accepted], config.robust_rule,
                                  config.effective_server_lr, config.server_momentum, evaluator)
        broadcast = None
        if downlink is not None:
            changed = outcome.refusal is None
            rebuilt, broadcast = downlink.step(number, current.params, outcome.model.params if changed else None,
                                               outcome.model.buffers)
            figures = evaluator(rebuilt, outcome.model.buffers) if evaluator and changed else \
                (outcome.model.accuracy, outcome.model.loss)
            current = GlobalModel(rebuilt, outcome.model.velocity, outcome.model.buffers, *figures)
        else:
            current = outcome.model
        if observe is not None:
            observe(RoundGradients(number, true_gradients, {k: workers[k].trainer.num_samples for k in true_gradients},
                                   before=result.params, after=current.params))
        result.params, result.buffers = current.params, current.buffers
        record = {
            "round": number,
            "full_units": sum(a.full_units for a in accepted),
            "scalar_units": sum(a.scalar_units for a in accepted),
            "floats_uploaded": sum(a.floats_uploaded for a in accepted),
            "full_equivalent_floats": len(accepted) * sum(p.numel() for p in params),
            "clipped_updates": outcome.clipped_updates,
            "round_discarded": outcome.refusal is not None,
            "downlink_scalar_units": broadcast.scalar_units if broadcast else 0,
        }
        if evaluate_every_round or number == config.rounds:
            record["test_accuracy"], record["test_loss"] = current.accuracy, current.loss
        record["round_seconds"] = time.monotonic() - started
        result.rounds.append(record)
    return result
