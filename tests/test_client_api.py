"""The client API (lbgm.client): users' own training scripts federate over real gRPC with LBGM, and
a script that misuses it gets one clear error while nothing reaches the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lbgm.client
from lbgm.cli.main import fetch_status
from lbgm.experiment.config import ExperimentConfig
from lbgm.common.state_files import load

from conftest import ServerProcess, assert_mirrors_equal_worker_lbgs, start_server

# An ordinary training script (its own model, data, Adam and loop, and an evaluation on held-out data) plus
# the client API's lines. Its model and data are those of test_tasks' task file (96 samples per shard).
SCRIPT = '''
import json, sys
import torch
from torch import nn
from torch.nn import functional as F
import lbgm.client
from lbgm.task import Evaluation


def examples(seed, count):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 8, generator=generator)
    return inputs, (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 1).long()


@torch.no_grad()
def evaluate(model):
    logits = model(held_out[0])
    return Evaluation(loss=float(F.cross_entropy(logits, held_out[1])),
                      accuracy=float((logits.argmax(1) == held_out[1]).float().mean()), samples=len(held_out[1]))


torch.manual_seed(int(sys.argv[1]))  # each script starts from other weights: the server's replace them
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
held_out = examples(7 + int(sys.argv[1]), 100 + 20 * int(sys.argv[1]))
federation = lbgm.client.connect(model, evaluate=evaluate)
inputs, targets = examples(1000 + federation.shard.seed * 100 + federation.shard.index, 96)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
while federation.receive():
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    federation.send(num_samples=len(inputs), loss=loss.item())
    torch.save([p.detach().clone() for p in model.parameters()], sys.argv[2])  # what it trained last
print(json.dumps(vars(federation.stats)))
'''


def start_scripts(tmp_path: Path, target: str, count: int, state_dir: Path) -> list[subprocess.Popen]:
    script = tmp_path / "train_federated.py"
    script.write_text(textwrap.dedent(SCRIPT))
    started = []
    for index in range(count):
        env = {**os.environ, "LBGM_SERVER": target, "LBGM_NAME": f"script{index}", "LBGM_STATE_DIR": str(state_dir)}
        started.append(subprocess.Popen([sys.executable, str(script), str(index), str(tmp_path / f"trained{index}.pt")],
                                        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / f"script{index}.log", "w"),
                                        text=True))
    return started


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start_weights_server(tmp_path: Path, **settings) -> ServerProcess:
    """A server that holds only the initial weights the script's model class gives (no task, no data)."""
    torch.manual_seed(0)
    weights = tmp_path / "init.safetensors"
    lbgm.client.save_weights(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), weights)
    config = ExperimentConfig(weights=str(weights), task="no_such_module_for_lbgm:task", round_timeout=60.0,
                              max_worker_samples=200, **settings)
    return start_server(tmp_path, config)


def test_four_scripts_federate_with_scalar_updates_and_identical_mirrors(tmp_path, processes):
    server = start_weights_server(tmp_path, name="scripts", workers=4, rounds=6, delta=0.6, local_lr=0.01,
                                  federated_eval_every=3)
    processes.append(server.process)
    state_dir = tmp_path / "state"
    scripts = start_scripts(tmp_path, server.target, 4, state_dir)
    processes.extend(scripts)
    assert server.process.wait(timeout=120) == 0, server.log()
    stats = []
    for index, script in enumerate(scripts):
        out, _ = script.communicate(timeout=60)
        assert script.returncode == 0, (tmp_path / f"script{index}.log").read_text()
        stats.append(json.loads(out))
    assert [s["rounds"] for s in stats] == [6, 6, 6, 6]
    records = records_of(server.run_dir)
    assert all(r["participants"] == [1, 2, 3, 4] for r in records)
    assert sum(r["scalar_units"] for r in records) == sum(s["scalar_units"] for s in stats) > 0
    assert_mirrors_equal_worker_lbgs(server.run_dir, state_dir, [f"script{i}" for i in range(4)], 4)
    # Federated evaluation by the scripts' own evaluate: of the initial model (round 1's), of model 3
    # (round 4's) and of the final model, each over every script's held-out samples (100 + 120 + 140 + 160).
    evaluated = [r for r in records if r.get("federated_evaluation")]
    assert [r["test_model_round"] for r in evaluated] == [0, 3, 6]
    assert all((r["federated_evaluation"]["num_samples"], r["federated_evaluation"]["workers"]) == (520, 4)
               for r in evaluated)
    assert evaluated[-1]["test_accuracy"] > evaluated[0]["test_accuracy"]
    summary = json.loads((server.run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == evaluated[-1]["test_accuracy"]


def test_a_lone_script_s_weights_become_the_global_model_fedavg(tmp_path, processes):
    """With server_lr = local_lr and every layer in full, the server's step theta - lr * (theta - theta_local)
    / lr gives back the script's trained weights (up to float32 rounding): FedAvg of one worker."""
    server = start_weights_server(tmp_path, name="fedavg", workers=1, rounds=3, delta=0.0, local_lr=0.01)
    processes.append(server.process)
    [script] = start_scripts(tmp_path, server.target, 1, tmp_path / "state")
    processes.append(script)
    assert server.process.wait(timeout=120) == 0, server.log()
    assert script.wait(timeout=60) == 0, (tmp_path / "script0.log").read_text()
    final = load(server.run_dir / "final_model.pt")["params"]
    trained = torch.load(tmp_path / "trained0.pt")
    for global_param, script_param in zip(final, trained, strict=True):
        assert torch.allclose(global_param, script_param, atol=1e-6, rtol=0)


@pytest.fixture
def one_worker_server(tmp_path, processes):
    server = start_weights_server(tmp_path, name="misuse", workers=1, rounds=2, federated_eval_every=1)
    processes.append(server.process)
    return server


def test_a_script_that_changed_a_layer_s_shape_gets_an_error_and_sends_nothing(one_worker_server):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with lbgm.client.connect(model, server=one_worker_server.target, name="reshaper") as federation:
        with pytest.raises(lbgm.client.ClientError, match=r"nothing to send: call receive\(\) first"):
            federation.send(num_samples=96, loss=1.0)
        assert federation.receive()
        before = fetch_status(one_worker_server.target).uplink_bytes  # the (empty) evaluation report's bytes
        with pytest.raises(lbgm.client.ClientError, match="num_samples must be a positive int"):
            federation.send(num_samples=0, loss=1.0)
        with pytest.raises(lbgm.client.ClientError, match="loss must be a finite number"):
            federation.send(num_samples=96, loss=float("nan"))
        model[2] = nn.Linear(16, 4)
        with pytest.raises(lbgm.client.ClientError, match=r"parameter 2\.weight is torch\.float32 \(4, 16\) now, "
                                                          r"the server's model has torch\.float32 \(3, 16\)"):
            federation.send(num_samples=96, loss=1.0)
        assert "call send() first" in str(pytest.raises(lbgm.client.ClientError, federation.receive).value)
        assert fetch_status(one_worker_server.target).uplink_bytes == before


def test_bad_settings_and_a_different_model_are_refused_with_one_line(one_worker_server, monkeypatch):
    monkeypatch.delenv("LBGM_SERVER", raising=False)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(lbgm.client.ClientError, match="must look like HOST:PORT"):
        lbgm.client.connect(model)
    with pytest.raises(lbgm.client.ClientError, match="join token must be at least 16 characters"):
        lbgm.client.connect(model, server=one_worker_server.target, join_token="short")
    wide = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    with pytest.raises(lbgm.client.ClientError, match=r"expected parameter 0\.weight float32\[16, 8\], "
                                                      r"got parameter 0\.weight float32\[32, 8\]"):
        lbgm.client.connect(wide, server=one_worker_server.target, name="wide")
    status = fetch_status(one_worker_server.target)
    assert (status.workers_joined, status.uplink_bytes) == (0, 0)  # refused at join: no slot taken


def test_an_evaluate_that_returns_no_evaluation_raises_in_receive_and_reports_nothing(one_worker_server):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with lbgm.client.connect(model, server=one_worker_server.target, name="evaluator",
                             evaluate=lambda model: 0.5) as federation:
        with pytest.raises(lbgm.client.ClientError, match=r"evaluate must return a lbgm.task.Evaluation with "
                                                          r"samples >= 1 .*got 0.5"):
            federation.receive()
        assert federation.receive()  # the round itself still comes; the evaluation counted no samples
        assert federation.send(num_samples=96, loss=1.0)
