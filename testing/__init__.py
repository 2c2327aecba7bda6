"""A local federation inside a user's own tests: the server and worker OS processes of `lbgm run`,
over real gRPC on 127.0.0.1, for one task, a few rounds, and the summary and final model back.

    from lbgm.testing import local_federation

    def test_my_task_federates():
        with local_federation("my_task.py:task", workers=4, rounds=3, local_lr=0.05) as result:
            assert result.summary["rounds_completed"] == 3
            model = result.module()   # the task's model holding the final weights

With pytest the `lbgm_federation` fixture (lbgm.testing.pytest_plugin, loaded automatically once lbgm
is installed) does the same and keeps the run folder under the test's tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.devices import local_device
from lbgm.common.state_files import load
from lbgm.launch.federation import LaunchError, Placement, federation_processes, local_placement, log_tails
from lbgm.server.evaluation import load_state
from lbgm.task.loader import build_model, check_task, load_task

__all__ = ["FederationError", "FederationResult", "local_federation"]


class FederationError(RuntimeError):
    """The federation did not finish: every worker failed, the server failed or it ran out of time. The
    message ends with the tail of every process's log; `processes` are the (stopped) OS processes."""

    def __init__(self, message: str, processes: list[subprocess.Popen]) -> None:
        super().__init__(message)
        self.processes = processes


@dataclass(frozen=True)
class FederationResult:
    """A finished federation: its summary.json, the final model's parameters and buffers (final_model.pt,
    in the model's order), the run folder and the config it ran."""

    summary: dict[str, Any]
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    run_dir: Path
    config: ExperimentConfig
    processes: list[subprocess.Popen]

    def module(self) -> nn.Module:
        """The task's model (built in this process) holding the final parameters and buffers."""
        model = build_model(load_task(self.config.task, self.config.task_options), self.config.seed,
                            self.config.task)
        load_state(model, self.params, self.buffers)
        return model


@contextmanager
def local_federation(task: str, workers: int = 4, rounds: int = 3, processes: int = 0, *,
                     out_dir: Path | None = None, timeout: float = 300.0, log_level: str = "INFO",
                     device: str = "cpu", server_device: str = "cpu", **settings: Any) -> Iterator[FederationResult]:
    """Runs `task` (package.module:name or path/to/file.py:name) with `workers` workers in `processes`
    worker processes (0: one per core but one, at least one, at most one per worker) for `rounds` rounds, then yields its result.
    The workers train on `device` and the server evaluates on `server_device` (auto, cpu, cuda, cuda:N,
    mps; DeviceError if this machine has no such device, before any process starts).
    `settings` are further ExperimentConfig fields (delta, local_lr, seed, name, ...). The run folder is
    <out_dir>/<name>; without out_dir it is a temporary folder removed when the context exits. No process
    outlives the call: a failure stops them all and raises FederationError with their log tails; a task
    that does not load or build its model raises TaskError before any process starts."""
    config = ExperimentConfig(task=task, workers=workers, rounds=rounds, **{"name": "local-federation", **settings})
    local_device(device, "device")
    local_device(server_device, "server_device")
    check_task(config.task, config.task_options, config.seed)
    placement = local_placement(workers, processes, ("--device", server_device), ("--device", device))
    with tempfile.TemporaryDirectory(prefix="lbgm-federation-") as temporary:
        root = Path(temporary) if out_dir is None else Path(out_dir)
        yield _run(config, root, placement, timeout, log_level)


def _run(config: ExperimentConfig, out_dir: Path, placement: Placement, timeout: float, log_level: str) -> FederationResult:
    """The federation to its end; every process has exited when this returns or raises."""
    deadline = time.monotonic() + timeout
    started: list[subprocess.Popen] = []

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise LaunchError(f"the federation did not finish within {timeout:g} s")

    try:
        with federation_processes(config, out_dir, placement, log_level) as federation:
            started = federation.processes
            federation.wait(check_time)
    except LaunchError as error:
        raise FederationError(f"{error}\n{log_tails(out_dir / config.name / 'logs')}", started) from None
    run_dir = federation.run_dir
    if federation.server.returncode != 0:
        raise FederationError(f"the server exited with status {federation.server.returncode}\n"
                              f"{log_tails(federation.logs)}", started)
    state = load(run_dir / "final_model.pt")
    return FederationResult(json.loads((run_dir / "summary.json").read_text()), list(state["params"]),
                            list(state["buffers"]), run_dir, config, started)
