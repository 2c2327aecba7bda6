"""Helpers that start real server and worker processes on localhost."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbgm.common.codec import tensor_to_bytes
from lbgm.experiment.config import ExperimentConfig, config_to_toml
from lbgm.common.grpc_options import PROTOCOL
from lbgm.common.state_files import lbgs_from_state, load

# The head of the task files tests write as users would: imports and a synthetic 3-class data set
# (8 features), from which each task builds its shards, held-out and test data.
SYNTHETIC_TASK_HEAD = '''
import torch
from torch import nn
from torch.nn import functional as F

from lbgm.task import Evaluation, Examples, LocalResult, Task


def examples(seed: int, count: int) -> Examples:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 8, generator=generator)
    targets = (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 1).long()
    return Examples(inputs, targets)
'''

# Small, fast settings: the MLP with the reference preset (one full-shard batch per round).
FAST = dict(model="mlp", local_steps=1, batch_size=0, local_lr=0.5, round_timeout=60.0)


def lbgm(*args: str) -> list[str]:
    return [sys.executable, "-m", "lbgm.cli", *args]


def join_request(stub, name: str, metadata=None, pb=None, protocol: str = PROTOCOL):
    """A JoinRequest as an honest worker sends it: with the model the server's experiment describes
    (asked with GetExperiment first). `pb` is the message module (a test may build its own from the .proto)."""
    from lbgm.v1 import lbgm_pb2
    pb = pb or lbgm_pb2
    spec = stub.GetExperiment(pb.ExperimentRequest(worker_name=name, protocol=protocol), timeout=10, metadata=metadata)
    return pb.JoinRequest(worker_name=name, protocol=protocol, model_tensors=spec.model_tensors)


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    run_dir: Path
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()


def start_server(tmp_path: Path, config: ExperimentConfig, extra_args: Sequence[str] = (), port: int = 0,
                 log_name: str = "server.log") -> ServerProcess:
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_to_toml(config))
    port_file = tmp_path / "port"
    port_file.unlink(missing_ok=True)
    log_path = tmp_path / log_name
    process = subprocess.Popen(
        lbgm("server", "--config", str(config_path), "--port", str(port), "--port-file", str(port_file),
             "--out-dir", str(tmp_path / "runs"), *extra_args),
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return ServerProcess(process, int(port_file.read_text()), tmp_path / "runs" / config.name, log_path)


def start_worker(tmp_path: Path, target: str, name: str, virtual_workers: int = 1,
                 state_dir: Path | None = None, extra_args: Sequence[str] = ()) -> subprocess.Popen:
    args = ["worker", "--server", target, "--name", name, "--virtual-workers", str(virtual_workers),
            "--poll-seconds", "5", "--give-up-after", "30", *extra_args]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    # Appending: a restarted worker (same name) keeps the log of its previous life.
    return subprocess.Popen(lbgm(*args), stdout=open(tmp_path / f"{name}.log", "a"), stderr=subprocess.STDOUT)


@pytest.fixture
def processes():
    """Processes a test starts; whatever is still running at the end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_mirrors_equal_worker_lbgs(run_dir: Path, state_dir: Path, names: Sequence[str], units: int) -> None:
    """The server's final mirrors (run_dir/mirrors.pt) equal every worker's --state-dir LBGs bit for bit."""
    mirrors = load(run_dir / "mirrors.pt")
    assert sorted(mirrors) == sorted(names)
    for name, server_state in mirrors.items():
        worker_lbgs = lbgs_from_state(load(state_dir / f"{name}.lbg.pt"))
        server_lbgs = lbgs_from_state(server_state)
        assert sorted(worker_lbgs) == sorted(server_lbgs) == list(range(units))
        for unit, lbg in worker_lbgs.items():
            assert server_lbgs[unit].version == lbg.version
            assert [tensor_to_bytes(t) for t in server_lbgs[unit].tensors] == [tensor_to_bytes(t) for t in lbg.tensors]
