"""lbgm.testing: a user's CI runs their task as a real local federation (server and worker processes
over gRPC on 127.0.0.1) and gets the summary and the final model back; no process outlives it."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from lbgm.common.state_files import load
from lbgm.task.loader import TaskError
from lbgm.testing import FederationError, local_federation

from test_tasks import write_task

SETTINGS = dict(delta=0.6, local_steps=3, batch_size=0, local_lr=0.01, round_timeout=60.0)


def assert_all_exited(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        assert process.returncode is not None
        with pytest.raises(ProcessLookupError):  # exited and reaped: the pid names no process
            os.kill(process.pid, 0)


def test_fixture_runs_the_task_and_returns_the_summary_and_the_final_model(lbgm_federation, tmp_path):
    result = lbgm_federation(f"{write_task(tmp_path / 'user')}:task", workers=4, rounds=3, processes=2,
                             **SETTINGS)
    summary = result.summary
    assert summary["rounds_completed"] == 3
    assert summary["uplink_bytes"] > 0 and summary["refused_uploads"] == 0
    assert summary["scalar_units"] + summary["full_units"] == 3 * 4 * 4  # rounds x workers x parameter tensors
    assert result.run_dir == tmp_path / "local-federation"
    saved = load(result.run_dir / "final_model.pt")
    assert all(torch.equal(a, b) for a, b in zip(result.params, saved["params"], strict=True))
    module = result.module()
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), saved["params"], strict=True))
    assert len(result.processes) == 3  # the server and two worker processes
    assert_all_exited(result.processes)


FAILING_TRAINING = '''

def broken(local):
    raise RuntimeError("the user's training broke")


broken_training = Task(model=task.model, train_data=task.train_data, train=broken)


def raising_model():
    raise ValueError("no model today")


broken_model = Task(model=raising_model, train_data=task.train_data)
'''


def test_a_failing_task_raises_with_the_log_tails_and_leaves_no_process(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text() + FAILING_TRAINING)
    with pytest.raises(FederationError, match="every worker process failed") as failure:
        with local_federation(f"{path}:broken_training", workers=2, rounds=2, processes=2, **SETTINGS):
            pass
    message = str(failure.value)
    assert "--- worker-0.log" in message and "--- server.log" in message
    assert "the user's training broke" in message
    assert len(failure.value.processes) == 3
    assert_all_exited(failure.value.processes)


def test_a_model_factory_that_raises_stops_before_any_process_starts(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text() + FAILING_TRAINING)
    with pytest.raises(TaskError, match="the model factory raised ValueError: no model today"):
        with local_federation(f"{path}:broken_model", workers=2, rounds=2, out_dir=tmp_path / "runs"):
            pass
    assert not (tmp_path / "runs").exists()


def test_without_out_dir_the_run_folder_goes_when_the_context_exits(tmp_path):
    with local_federation(f"{write_task(tmp_path)}:task", workers=2, rounds=1, **SETTINGS) as result:
        assert (result.run_dir / "summary.json").is_file()
    assert not result.run_dir.exists()
