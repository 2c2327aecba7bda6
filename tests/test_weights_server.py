"""A server without the user's code: `lbgm init-weights` writes the task's initial model, `lbgm server
--weights FILE` runs from it alone (no task import, no data) and gets its evaluation from the workers
(federated evaluation); bad weights files stop the server with one line."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lbgm.cli.main import main
from lbgm.common.codec import tensor_to_bytes
from lbgm.experiment.config import ExperimentConfig
from lbgm.common.state_files import load
from lbgm.common.weights import read_weights
from lbgm.server.evaluation import aggregate_evaluations, checked_report, load_state
from lbgm.server.rounds import Coordinator
from lbgm.server.updates import UpdateRejected
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.task import Shard
from lbgm.task.loader import build_model, load_task

from conftest import SYNTHETIC_TASK_HEAD, assert_mirrors_equal_worker_lbgs, start_server, start_worker

# A user's task with held-out data per worker (federated evaluation), its own metric, shards of
# different sizes (so the weighting matters) and BatchNorm (buffers, one of them int64).
EVAL_TASK = SYNTHETIC_TASK_HEAD + '''
HIDDEN = {hidden}


@torch.inference_mode()
def evaluate(model, data):
    model.eval()
    logits = model(data.inputs)
    return Evaluation(loss=float(F.cross_entropy(logits, data.targets)),
                      accuracy=float((logits.argmax(1) == data.targets).float().mean()),
                      metrics={{"mean_logit": float(logits.mean())}})


task = Task(
    model=lambda: nn.Sequential(nn.Linear(8, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 3)),
    train_data=lambda shard: examples(1000 + shard.seed * 100 + shard.index, 64 + 16 * shard.index),
    validation_data=lambda shard: examples(5000 + shard.index, 20 + 10 * shard.index),
    test_data=lambda data_dir: examples(7, 256),
    evaluate=evaluate,
)
'''
NAMES = ["host0-0", "host0-1", "host1-0", "host1-1"]


def write_eval_task(folder: Path, hidden: int = 16) -> str:
    """The task's reference (path/to/file.py:task)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"eval_task_{hidden}.py"
    path.write_text(textwrap.dedent(EVAL_TASK.format(hidden=hidden)))
    return f"{path}:task"


def run_federation(tmp_path: Path, config: ExperimentConfig, task: str, processes: list) -> tuple[Path, list[dict]]:
    """Server and two worker processes (two virtual workers each) running `task`; the run folder and records."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    server = start_server(tmp_path, config)
    processes.append(server.process)
    workers = [start_worker(tmp_path, server.target, f"host{i}", virtual_workers=2, state_dir=tmp_path / "state",
                            extra_args=("--task", task)) for i in range(2)]
    processes.extend(workers)
    assert server.process.wait(timeout=180) == 0, server.log()
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    return server.run_dir, [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]


def federated_figures(task_reference: str, config: ExperimentConfig, params, buffers) -> dict[str, float]:
    """What federated evaluation of a model state must give: every worker's evaluation of it on its own
    validation data, averaged with weights n_k / sum n (computed here, apart from the server)."""
    task = load_task(task_reference, config.task_options)
    model = build_model(task, config.seed, task_reference)
    load_state(model, params, buffers)
    reports = []
    for index in range(config.workers):
        data = task.validation_data(Shard(index, config.workers, config.seed, None))
        reports.append((len(data), task.evaluate(model, data)))
    total = sum(n for n, _ in reports)
    return {"loss": sum(n * e.loss for n, e in reports) / total,
            "accuracy": sum(n * e.accuracy for n, e in reports) / total,
            "mean_logit": sum(n * e.metrics["mean_logit"] for n, e in reports) / total,
            "num_samples": total}


def test_init_weights_then_a_weights_server_holds_the_task_s_initial_model_bit_for_bit(tmp_path, capsys):
    task = write_eval_task(tmp_path / "user")
    path = tmp_path / "init.safetensors"
    assert main(["init-weights", "--task", task, "--seed", "5", "--out", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    model = build_model(load_task(task, ExperimentConfig().task_options), 5, task)
    coordinator = Coordinator(ExperimentConfig(task=task, seed=5, weights=str(path), workers=2), tmp_path / "run")
    assert coordinator.job.task == "" and coordinator.job.evaluate is None and coordinator.job.shard_sizes is None
    expected = [*model.parameters(), *model.buffers()]
    held = [*coordinator.params, *coordinator.buffers]
    assert [tensor_to_bytes(t) for t in held] == [tensor_to_bytes(t.detach()) for t in expected]
    assert [t.dtype for t in held] == [t.dtype for t in expected]  # num_batches_tracked stays int64
    names = [name for name, _ in (*model.named_parameters(), *model.named_buffers())]
    assert [spec.name for spec in coordinator.model_tensors] == names
    assert [spec.buffer for spec in coordinator.model_tensors] == [False] * 6 + [True] * 3
    # the upload rules are the ones a server given the task derives
    assert coordinator.rules == Coordinator(ExperimentConfig(task=task, seed=5, workers=2), tmp_path / "run2").rules
    assert "the server has no data" in (tmp_path / "run" / "partition.txt").read_text()


def test_a_server_from_weights_alone_ends_with_the_model_of_a_server_given_the_task(tmp_path, processes):
    task = write_eval_task(tmp_path / "user")
    settings = dict(task=task, workers=4, rounds=5, delta=0.6, local_steps=2, batch_size=0, local_lr=0.05,
                    round_timeout=60.0)
    task_dir, task_records = run_federation(tmp_path / "with-task", ExperimentConfig(name="task", **settings), task,
                                            processes)
    weights = tmp_path / "init.safetensors"
    assert main(["init-weights", "--task", task, "--out", str(weights)]) == 0
    # A task reference that does not even import: the server never loads the task.
    config = ExperimentConfig(name="weights", weights=str(weights), **{**settings, "task": "no_such_module_for_lbgm:task"})
    weights_dir, records = run_federation(tmp_path / "from-weights", config, task, processes)

    with_task, from_weights = load(task_dir / "final_model.pt"), load(weights_dir / "final_model.pt")
    for kind in ("params", "buffers"):
        assert [tensor_to_bytes(t) for t in from_weights[kind]] == [tensor_to_bytes(t) for t in with_task[kind]]
    assert sum(r["scalar_units"] for r in records) > 0
    assert [r["scalar_units"] for r in records] == [r["scalar_units"] for r in task_records]
    assert_mirrors_equal_worker_lbgs(weights_dir, tmp_path / "from-weights" / "state", NAMES, 6)

    # central evaluation with the task, federated without it, each saying which model it describes
    assert [r["test_source"] for r in task_records] == ["central"] * 5
    assert [r["test_model_round"] for r in task_records] == [1, 2, 3, 4, 5]
    assert all(r["federated_evaluation"] is None for r in task_records)
    assert [r["test_source"] for r in records] == ["federated"] * 5
    assert [r["test_model_round"] for r in records] == [0, 1, 2, 3, 5]  # model 4: the final round evaluates 5
    initial = read_weights(weights)
    for model_round, params, buffers in ((0, initial.params, initial.buffers),
                                         (5, from_weights["params"], from_weights["buffers"])):
        record = next(r for r in records if r["test_model_round"] == model_round)
        expected = federated_figures(task, ExperimentConfig(**settings), params, buffers)
        reported = record["federated_evaluation"]
        assert reported["workers"] == 4 and reported["num_samples"] == expected["num_samples"] == 20 + 30 + 40 + 50
        assert record["test_loss"] == reported["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert record["test_accuracy"] == reported["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-6)
        assert reported["metrics"]["mean_logit"] == pytest.approx(expected["mean_logit"], rel=1e-5, abs=1e-7)
    assert records[0]["samples_by_worker"] == {"1": 64, "2": 80, "3": 96, "4": 112}
    summary = json.loads((weights_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == records[-1]["test_accuracy"]
    assert (summary["final_accuracy_source"], summary["final_accuracy_model_round"]) == ("federated", 5)
    # the evaluation reports are counted bytes, in the delta = 0 equivalent too
    assert all(r["uplink_by_kind"]["evaluation"] > 0 for r in records if r["test_source"])
    assert summary["uplink_bytes"] < summary["full_equivalent_uplink_bytes"]
    assert "the server has no data" in (weights_dir / "partition.txt").read_text()


def bad_weights_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """what -> (file, a piece of the expected message)."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    plain = folder / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))

    def with_metadata(name: str, tensors: dict, parameters: str, buffers: str = "[]") -> Path:
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"lbgm_format": "1", "lbgm_parameters": parameters,
                                                "lbgm_buffers": buffers})
        return path

    two = {"a": torch.zeros(2), "b": torch.zeros(3)}
    return {
        "missing": (folder / "missing.safetensors", "does not exist"),
        "not safetensors": (garbage, "is not a safetensors file"),
        "no lbgm metadata": (plain, "has no lbgm metadata (this lbgm reads format 1); write one with "
                                    "`lbgm init-weights --task REFERENCE --out FILE`"),
        "lists a tensor it lacks": (with_metadata("lacks", two, '["a", "b", "c"]'),
                                    "inconsistent lbgm metadata: it lists ['c'], which the file does not hold"),
        "holds an unlisted tensor": (with_metadata("unlisted", two, '["a"]'),
                                     "the file holds ['b'], which it does not list"),
        "lists a tensor twice": (with_metadata("twice", two, '["a", "b"]', '["a"]'), "it lists ['a'] twice"),
        "no parameters": (with_metadata("none", two, "[]", '["a", "b"]'), "it lists no parameters"),
        "names not JSON": (with_metadata("json", two, "a, b"), "metadata 'lbgm_parameters' is missing or not JSON"),
        "integer parameter": (with_metadata("int", {"a": torch.zeros(2, dtype=torch.int64)}, '["a"]'),
                              "parameters ['a'] are not floating point"),
    }


@pytest.mark.parametrize("command", [["server", "--port", "0"], ["run"]], ids=["server", "run"])
def test_bad_weights_files_stop_the_server_and_run_with_one_line_and_nothing_written(tmp_path, capsys, command):
    out = tmp_path / "runs"
    keep = out / "lbgm" / "metrics.jsonl"  # a run the server must not clear
    keep.parent.mkdir(parents=True)
    keep.write_text("{}\n")
    for what, (path, message) in bad_weights_files(tmp_path / "files").items():
        status = main([*command, "--weights", str(path), "--out-dir", str(out), "--rounds", "1"])
        error = capsys.readouterr().err.strip().splitlines()
        assert status == 2, what
        assert len(error) == 1 and error[0].startswith(f"lbgm {command[0]}: error: weights file "), (what, error)
        assert message in error[0], (what, error[0])
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == [Path("lbgm"), Path("lbgm/metrics.jsonl")], what


def test_federated_evaluation_settings_are_checked_and_resolved():
    assert ExperimentConfig().federated_eval_period(central_evaluation=True) == 0
    assert ExperimentConfig().federated_eval_period(central_evaluation=False) == 1
    assert ExperimentConfig(federated_eval_every=3).federated_eval_period(central_evaluation=True) == 3
    assert ExperimentConfig(federated_eval_every=0).federated_eval_period(central_evaluation=False) == 0
    for bad in (dict(federated_eval_every=-2), dict(max_worker_samples=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ExperimentConfig(**bad)


def report(n: int, loss: float, accuracy: float = math.nan, **metrics: float) -> pb.EvaluationReport:
    return pb.EvaluationReport(worker_id=1, round=3, num_samples=n, loss=loss, accuracy=accuracy, metrics=metrics)


def test_evaluations_average_by_sample_count_over_the_workers_that_have_each_figure():
    reports = [checked_report(r, 1000) for r in (report(10, 1.0, 0.5, f1=0.2), report(30, 2.0, math.nan),
                                                  report(0, 0.0), report(60, 3.0, 0.8, f1=0.4))]
    result = aggregate_evaluations(7, reports)
    assert (result.model_round, result.num_samples, result.workers) == (7, 100, 3)
    assert result.loss == pytest.approx((10 * 1.0 + 30 * 2.0 + 60 * 3.0) / 100)
    assert result.accuracy == pytest.approx((10 * 0.5 + 60 * 0.8) / 70)  # the worker without accuracy is left out
    assert result.metrics == {"f1": pytest.approx((10 * 0.2 + 60 * 0.4) / 70)}
    assert math.isnan(aggregate_evaluations(1, [checked_report(report(0, 0.0), 10)]).loss)


@pytest.mark.parametrize("bad, message", [
    (report(1001, 1.0), "more than max_worker_samples (1000)"),
    (report(5, math.inf), "loss is not finite"),
    (report(5, 1.0, math.inf), "accuracy is inf"),
    (report(5, 1.0, 0.5, f1=math.nan), "metric 'f1' is not finite"),
    (report(5, 1.0, 0.5, **{"x" * 65: 1.0}), "must be 1-64 printable characters"),
    (report(5, 1.0, 0.5, **{f"m{i}": 1.0 for i in range(33)}), "33 metrics, at most 32"),
])
def test_a_bad_evaluation_report_is_refused_as_malformed(bad, message):
    with pytest.raises(UpdateRejected, match=re.escape(message)) as refused:
        checked_report(bad, 1000)
    assert refused.value.reason == pb.ErrorDetail.MALFORMED


def test_a_weights_server_resumes_from_its_checkpoint_without_the_task(tmp_path, processes):
    """Extending a finished run: the checkpoint holds tensors only, so the resumed server needs the
    weights file and the settings, never the task (whose reference here does not even import)."""
    task = write_eval_task(tmp_path / "user")
    weights = tmp_path / "init.safetensors"
    assert main(["init-weights", "--task", task, "--out", str(weights)]) == 0
    config = ExperimentConfig(name="resume", task="no_such_module_for_lbgm:task", weights=str(weights), workers=2,
                              rounds=2, delta=0.6, local_lr=0.05, round_timeout=60.0)
    first = start_server(tmp_path, config)
    processes.append(first.process)
    workers = [start_worker(tmp_path, first.target, "host", virtual_workers=2, state_dir=tmp_path / "state",
                            extra_args=("--task", task))]
    processes.extend(workers)
    assert first.process.wait(timeout=120) == 0, first.log()
    assert workers[0].wait(timeout=60) == 0
    extended = start_server(tmp_path, dataclasses.replace(config, rounds=4), extra_args=("--resume",),
                            log_name="resumed.log")
    processes.append(extended.process)
    worker = start_worker(tmp_path, extended.target, "host", virtual_workers=2, state_dir=tmp_path / "state",
                          extra_args=("--task", task))
    processes.append(worker)
    assert extended.process.wait(timeout=120) == 0, extended.log()
    assert worker.wait(timeout=60) == 0
    records = [json.loads(line) for line in (extended.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert [r["test_model_round"] for r in records] == [0, 2, 2, 4]
    assert all(r["participants"] == [1, 2] for r in records)
    summary = json.loads((extended.run_dir / "summary.json").read_text())
    assert (summary["final_accuracy_source"], summary["final_accuracy_model_round"]) == ("federated", 4)
    assert "resumed from" in extended.log()
