"""What the server knows of the job it aggregates: from the task's code, or from a weights file alone.

With the task (`task = "..."`), the server builds the task's model and every shard's data, as the
workers do: it knows each shard's size (so it checks every upload's sample count exactly), can
evaluate the global model on the task's test set, and describes the partition. From a weights
file (`weights = "..."`), it holds tensors only: no model class, no data, no task import. Sample
counts are then the workers' own claims, bounded by `max_worker_samples`, and evaluation comes
from the workers (federated evaluation). Both give the same initial model and the same upload
rules, which derive from the tensor description in either case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.weights import ModelState, read_weights
from lbgm.server.evaluation import load_state
from lbgm.task import Shard, Task
from lbgm.task.loader import build_model, call_task, load_task

# (params, buffers) -> (test accuracy, test loss) of that model state
CentralEvaluation = Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[float, float]]


@dataclass(frozen=True)
class ServerJob:
    initial: ModelState  # the model before round 1
    source: str  # what the model came from, for logs and the ExperimentSpec: "task REF" or "weights FILE"
    task: str  # the task reference sent to workers ("" from a weights file: the server does not run one)
    shard_sizes: list[int] | None  # every shard's training samples; None: the server has no data
    partition: str  # partition.txt
    evaluate: CentralEvaluation | None  # None: no central evaluation


def shard_data(task: Task, config: ExperimentConfig) -> list:
    """Every worker's training data, as the workers load it."""
    return [call_task(config.task, f"train_data of shard {index}", task.train_data,
                      Shard(index, config.workers, config.seed, config.data_path))
            for index in range(config.workers)]


def job_from_task(config: ExperimentConfig, eval_device: torch.device) -> ServerJob:
    """The task's model and data, built as the workers build theirs."""
    task = load_task(config.task, config.task_options)
    model = build_model(task, config.seed, config.task)
    initial = ModelState.of_model(model)
    shards = shard_data(task, config)
    sizes = [len(shard) for shard in shards]
    if task.describe_shards is not None:
        partition = task.describe_shards(shards)
    else:
        partition = "\n".join(f"worker {index}: {size} samples" for index, size in enumerate(sizes))
    evaluate = None
    if task.test_data is not None and task.evaluate is not None:
        test_data = call_task(config.task, "test_data", task.test_data, config.data_path)
        model.to(eval_device)

        def evaluate(params: list[torch.Tensor], buffers: list[torch.Tensor]) -> tuple[float, float]:
            """The driver thread alone calls this (it owns `model`)."""
            load_state(model, params, buffers)
            result = task.evaluate(model, test_data)
            return float(result.accuracy), float(result.loss)

    return ServerJob(initial, f"task {config.task}", config.task, sizes, partition, evaluate)


def job_from_weights(config: ExperimentConfig) -> ServerJob:
    """Tensors only: the weights file's model, no data, no central evaluation."""
    path = Path(config.weights)
    initial = read_weights(path)
    partition = (f"the server has no data: it runs from the weights file {path}, without the task's code. "
                 f"Each of the {config.workers} workers loads its own shard with its own task; the sample counts "
                 f"they report are in metrics.jsonl (samples_by_worker; at most max_worker_samples = "
                 f"{config.max_worker_samples} each)")
    return ServerJob(initial, f"weights file {path}", "", None, partition, None)


def load_server_job(config: ExperimentConfig, eval_device: torch.device = torch.device("cpu")) -> ServerJob:
    return job_from_weights(config) if config.weights else job_from_task(config, eval_device)
