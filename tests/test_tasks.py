"""The task API: a user's own task from a file outside the package federates over real gRPC, and
every bad task reference stops a command with one line, exit status 2 and nothing written."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from lbgm.cli.main import main
from lbgm.experiment.config import ExperimentConfig
from lbgm.common.model_spec import describe_model, model_differences
from lbgm.task import LocalResult, Task
from lbgm.worker.trainer import LocalTrainer, update_of

from conftest import SYNTHETIC_TASK_HEAD, assert_mirrors_equal_worker_lbgs, start_server, start_worker

# A task as a user writes it: its own model, synthetic data, its own loss and an Adam loop.
OWN_TASK = SYNTHETIC_TASK_HEAD + '''
HIDDEN = {hidden}


def smoothed_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


def adam(local):
    optimizer = torch.optim.Adam(local.model.parameters(), lr=local.lr)
    total = 0.0
    for _ in range(local.steps):
        inputs, targets = local.data.batch(local.next_batch(local.batch_size))
        optimizer.zero_grad()
        loss = local.loss(local.model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return LocalResult(total / local.steps)


@torch.inference_mode()
def evaluate(model, data):
    logits = model(data.inputs)
    return Evaluation(loss=float(F.cross_entropy(logits, data.targets)),
                      accuracy=float((logits.argmax(1) == data.targets).float().mean()))


task = Task(
    model=lambda: nn.Sequential(nn.Linear(8, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 3)),
    train_data=lambda shard: examples(1000 + shard.seed * 100 + shard.index, 96),
    train=adam,
    loss=smoothed_cross_entropy,
    test_data=lambda data_dir: examples(7, 512),
    evaluate=evaluate,
)
'''


def write_task(folder: Path, hidden: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"own_task_{hidden}.py"
    path.write_text(textwrap.dedent(OWN_TASK.format(hidden=hidden)))
    return path


def test_own_task_from_a_file_federates_with_scalar_updates_and_identical_mirrors(tmp_path, processes):
    task = f"{write_task(tmp_path / 'user')}:task"
    config = ExperimentConfig(name="own-task", task=task, workers=4, rounds=6, delta=0.6, local_steps=3,
                              batch_size=0, local_lr=0.01, round_timeout=60.0)
    server = start_server(tmp_path, config)
    processes.append(server.process)
    state_dir = tmp_path / "state"
    workers = [start_worker(tmp_path, server.target, f"host{i}", virtual_workers=2, state_dir=state_dir,
                            extra_args=("--task", task)) for i in range(2)]
    processes.extend(workers)
    assert server.process.wait(timeout=120) == 0, server.log()
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["participants"] == [1, 2, 3, 4] for r in records)
    assert sum(r["scalar_units"] for r in records) > 0
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    assert_mirrors_equal_worker_lbgs(server.run_dir, state_dir, ["host0-0", "host0-1", "host1-0", "host1-1"], 4)
    # partition.txt without describe_shards: each shard's sample count
    assert (server.run_dir / "partition.txt").read_text().splitlines()[0] == "worker 0: 96 samples"


def test_worker_whose_model_differs_stops_at_join_naming_the_difference(tmp_path, processes):
    config = ExperimentConfig(name="mismatch", task=f"{write_task(tmp_path, 16)}:task", workers=1, rounds=1)
    server = start_server(tmp_path, config)
    processes.append(server.process)
    worker = start_worker(tmp_path, server.target, "other", extra_args=("--task", f"{write_task(tmp_path, 32)}:task"))
    processes.append(worker)
    assert worker.wait(timeout=60) == 1
    log = (tmp_path / "other.log").read_text()
    assert "differs from the server's" in log
    assert "tensor 0: expected parameter 0.weight float32[16, 8], got parameter 0.weight float32[32, 8]" in log


def test_model_differences_name_shapes_dtypes_and_counts():
    small = torch.nn.Sequential(torch.nn.Linear(4, 2))
    wide = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    assert model_differences(describe_model(small), describe_model(small)) == []
    assert model_differences(describe_model(small), describe_model(wide)) == [
        "tensor 0: expected parameter 0.weight float32[2, 4], got parameter 0.weight float32[3, 4]",
        "tensor 1: expected parameter 0.bias float32[2], got parameter 0.bias float32[3]",
        "expected 2 tensors, got 4"]
    assert model_differences(describe_model(small), describe_model(small.double())) == [
        "tensor 0: expected parameter 0.weight float32[2, 4], got parameter 0.weight float64[2, 4]",
        "tensor 1: expected parameter 0.bias float32[2], got parameter 0.bias float64[2]"]


def test_a_custom_training_s_update_is_the_weight_change_over_the_local_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]

    def adam(local):
        optimizer = torch.optim.Adam(local.model.parameters(), lr=local.lr)
        for _ in range(local.steps):
            optimizer.zero_grad()
            local.model(torch.ones(1, 3)).sum().backward()
            optimizer.step()
        return LocalResult(0.0)

    data = torch.zeros(5)
    trainer = LocalTrainer(Task(model=lambda: model, train_data=lambda _: data, train=adam), model, data, seed=0)
    gradient, _ = trainer.train(start, local_steps=3, batch_size=0, lr=0.1)
    for before, after, g in zip(start, model.parameters(), gradient):
        assert torch.allclose(before - 0.1 * g, after.detach())  # the server step with server_lr = local_lr
    with pytest.raises(TypeError, match="expected a lbgm.task.LocalResult"):
        update_of(0.5, start, list(model.parameters()), 0.1)


BAD_TASK_FILE = '''
from torch import nn
from lbgm.task import Examples, Task

NUMBER = 3

def not_a_task_factory(options):
    return "a string"

def raising_factory(options):
    raise RuntimeError("no GPU here")

broken_model = Task(model=lambda: nn.Linear(2, 0 - 1), train_data=lambda shard: Examples(None, None))
'''


def bad_references(folder: Path) -> dict[str, tuple[str, str]]:
    """reference -> (a piece of the expected message, what it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "bad_tasks.py"
    good.write_text(BAD_TASK_FILE)
    syntax = folder / "syntax_error.py"
    syntax.write_text("def broken(:\n")
    return {
        "no_such_module_for_lbgm:task": ("cannot import no_such_module_for_lbgm: ModuleNotFoundError", "no module"),
        f"{folder / 'missing.py'}:task": (f"no file {folder / 'missing.py'}", "no file"),
        f"{syntax}:task": ("cannot import", "syntax error"),
        f"{good}:nope": ("has no attribute 'nope'", "missing attribute"),
        f"{good}:NUMBER": ("is a int, expected a lbgm.task.Task", "not a task"),
        f"{good}:not_a_task_factory": ("the factory returned a str, expected a lbgm.task.Task", "factory"),
        f"{good}:raising_factory": ("the factory raised RuntimeError: no GPU here", "factory raises"),
        f"{good}:broken_model": ("the model factory raised RuntimeError", "model factory raises"),
        "lbgm.tasks.image": ("must look like package.module:name or path/to/file.py:name", "no name"),
    }


def test_bad_task_references_stop_run_server_and_sweep_with_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "runs"
    keep = out / "lbgm" / "checkpoint" / "manifest.json"  # a run the server must not clear
    keep.parent.mkdir(parents=True)
    keep.write_text("{}")
    for reference, (message, what) in bad_references(tmp_path / "user").items():
        for command in (["run"], ["server", "--port", "0"], ["sweep", "--grid", "seed=0,1"]):
            status = main([*command, "--task", reference, "--out-dir", str(out), "--rounds", "1"])
            error = capsys.readouterr().err.strip().splitlines()
            assert status == 2, (what, command)
            assert len(error) == 1 and error[0].startswith(f"lbgm {command[0]}: error: "), (what, error)
            assert message in error[0], (what, error[0])
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == [
            Path("lbgm"), Path("lbgm/checkpoint"), Path("lbgm/checkpoint/manifest.json")], what


def test_bad_task_reference_stops_a_worker_before_it_dials(tmp_path, capsys):
    for reference, (message, what) in bad_references(tmp_path).items():
        if what in ("factory", "factory raises", "model factory raises"):
            continue  # a factory needs the server's options: it runs at join
        assert main(["worker", "--server", "127.0.0.1:9", "--task", reference]) == 2, what
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("lbgm worker: error: ") and message in error[0], what
