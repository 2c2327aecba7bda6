"""--device: where a worker trains and decides, and where the server evaluates.

What the mirrors hold is what travelled, so a worker's look-back gradients equal the server's bit
for bit whatever device computed them. The tests marked `cuda` run on a machine with a CUDA device
(`./test.sh tests/test_devices.py`) and skip themselves elsewhere.
"""

from __future__ import annotations

import json
import subprocess
from collections import namedtuple
import textwrap
from pathlib import Path

import pytest
import torch

from lbgm.cli.main import fetch_status
from lbgm.common.codec import tensor_to_bytes
from lbgm.common.compressor_settings import COMPRESSORS
from lbgm.common.compressors import CODEC_OF, CompressorSettings, compress, decode
from lbgm.experiment.config import ExperimentConfig
from lbgm.common.devices import DeviceError, local_device, move_to, resolve_device
from lbgm.common.lookback import decision_units, rebuild
from lbgm.common.state_files import lbgs_from_state, load
from lbgm.common.wire import read_update_body, read_update_header, update_parts
from lbgm.server.updates import UploadRules, judge_update
from lbgm.task import Examples, LocalResult, LocalRound, Task
from lbgm.testing import local_federation
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker.encoder import LbgmEncoder
from lbgm.worker.trainer import LocalTrainer

from conftest import SYNTHETIC_TASK_HEAD, assert_mirrors_equal_worker_lbgs, lbgm, start_server, start_worker

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run ./test.sh tests/test_devices.py on one)")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
MALFORMED = "must be auto, cpu, cuda, cuda:N or mps"

# A task with the default training (sgd_steps moves each batch to the device), a BatchNorm buffer,
# and an evaluation that runs on whatever device the server's model is on.
DEVICE_TASK = SYNTHETIC_TASK_HEAD + '''

@torch.inference_mode()
def evaluate(model, data):
    device = next(model.parameters()).device
    logits = model(data.inputs.to(device))
    targets = data.targets.to(device)
    return Evaluation(loss=float(F.cross_entropy(logits, targets)),
                      accuracy=float((logits.argmax(1) == targets).float().mean()))


task = Task(
    model=lambda: nn.Sequential(nn.Linear(8, 24), nn.BatchNorm1d(24), nn.Tanh(), nn.Linear(24, 3)),
    train_data=lambda shard: examples(1000 + shard.index, 96),
    test_data=lambda data_dir: examples(7, 512),
    evaluate=evaluate,
)
'''


# ------------------------------------------------------------------ resolving a device name


def test_auto_picks_cuda_then_mps_then_cpu():
    assert resolve_device("auto", cuda_devices=2, mps_available=True) == torch.device("cuda")
    assert resolve_device("auto", cuda_devices=0, mps_available=True) == torch.device("mps")
    assert resolve_device("auto", cuda_devices=0, mps_available=False) == torch.device("cpu")
    assert resolve_device("cuda:1", cuda_devices=2, mps_available=False) == torch.device("cuda", 1)
    assert resolve_device("cuda", cuda_devices=1, mps_available=False) == torch.device("cuda")


@pytest.mark.parametrize("name, cuda_devices, mps, message", [
    ("cuda:2", 2, False, "'cuda:2' is not available: this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda:1", 1, False, "'cuda:1' is not available: this machine has 1 CUDA device (cuda:0 to cuda:0)"),
    ("cuda", 0, True, "'cuda' is not available: this machine has no CUDA device"),
    ("cuda:0", 0, False, "'cuda:0' is not available: this machine has no CUDA device"),
    ("mps", 4, False, "'mps' is not available: this machine has no MPS (Apple Metal) device"),
    ("gpu", 1, True, f"{MALFORMED}, got 'gpu'"),
    ("cuda:", 1, False, f"{MALFORMED}, got 'cuda:'"),
    ("cuda:-1", 1, False, f"{MALFORMED}, got 'cuda:-1'"),
    ("cpu:0", 0, False, f"{MALFORMED}, got 'cpu:0'"),
    ("", 0, False, f"{MALFORMED}, got ''"),
])
def test_absent_or_malformed_devices_are_refused_naming_what_exists(name, cuda_devices, mps, message):
    with pytest.raises(DeviceError) as error:
        resolve_device(name, cuda_devices, mps, what="--device")
    assert str(error.value).startswith("--device ")
    assert message in str(error.value)


def test_this_machine_resolves_auto_to_its_best_device_and_refuses_what_it_lacks():
    has_mps = torch.backends.mps.is_available()
    expected = "cuda" if HAS_CUDA else "mps" if has_mps else "cpu"
    assert local_device("auto").type == expected
    assert local_device("cpu") == torch.device("cpu")
    absent = [name for name, present in (("cuda", HAS_CUDA), (f"cuda:{torch.cuda.device_count()}", False),
                                         ("mps", has_mps)) if not present]
    for name in absent:
        with pytest.raises(DeviceError, match="is not available"):
            local_device(name)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_worker_on_a_missing_device_stops_in_one_line_before_it_joins(tmp_path, processes):
    server = start_server(tmp_path, ExperimentConfig(name="untouched", workers=1, rounds=1, model="mlp"))
    processes.append(server.process)
    result = subprocess.run(lbgm("worker", "--server", server.target, "--name", "gpu-host", "--device", "cuda:7"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lbgm worker: error: --device 'cuda:7' is not available: this machine has ")
    status = fetch_status(server.target)
    assert (status.workers_joined, status.completed_rounds) == (0, 0)
    assert "gpu-host" not in server.log()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("flag", ["--device", "--server-device"])
def test_lbgm_run_on_a_missing_device_stops_in_one_line_and_writes_nothing(tmp_path, flag):
    out = tmp_path / "runs"
    result = subprocess.run(lbgm("run", flag, "cuda", "--out-dir", str(out), "--rounds", "1", "--workers", "1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lbgm run: error: {flag} 'cuda' is not available: this machine has no CUDA device "
        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"]
    assert not out.exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_local_federation_on_a_missing_device_raises_before_any_process_starts(tmp_path):
    with pytest.raises(DeviceError, match="device 'cuda' is not available: this machine has no CUDA device"):
        with local_federation(write_task(tmp_path / "user"), workers=2, rounds=1, out_dir=tmp_path / "runs",
                              device="cuda"):
            pass
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ training on the device


@pytest.mark.parametrize("device", DEVICES)
def test_move_to_moves_every_tensor_in_nested_batches(device):
    Pair = namedtuple("Pair", "image label")
    batch = {"pair": Pair(torch.ones(2, 3, dtype=torch.float64), torch.arange(2)), "meta": [torch.zeros(2), "id"],
             "n": 2}
    moved = move_to((batch, torch.arange(2)), torch.device(device))
    assert isinstance(moved, tuple) and isinstance(moved[0]["pair"], Pair) and isinstance(moved[0]["meta"], list)
    assert [t.device.type for t in (*moved[0]["pair"], moved[0]["meta"][0], moved[1])] == [device] * 4
    assert moved[0]["meta"][1] == "id" and moved[0]["n"] == 2
    assert torch.equal(moved[0]["pair"].image.cpu(), batch["pair"].image)
    assert moved[0]["pair"].image.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_local_training_runs_on_the_device_and_its_update_matches_the_cpu_s(device):
    data = Examples(torch.randn(40, 5, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 3)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))

    reference = LocalTrainer(Task(model=model, train_data=lambda _: data), model(), data, seed=3)
    start = [t.detach().clone() for t in (*reference.model.parameters(), *reference.model.buffers())]
    expected, expected_loss = reference.train(start, local_steps=4, batch_size=8, lr=0.1)
    trainer = LocalTrainer(Task(model=model, train_data=lambda _: data), model(), data, seed=3,
                           device=torch.device(device))
    gradient, loss = trainer.train(start, local_steps=4, batch_size=8, lr=0.1)
    assert all(p.device.type == device for p in trainer.model.parameters())
    assert all(g.device.type == device for g in gradient)
    assert all(b.device.type == "cpu" for b in trainer.buffers())  # buffers travel from the CPU
    for got, want in zip(gradient, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_a_custom_training_gets_the_device_and_its_update_is_computed_there(device):
    data = Examples(torch.randn(12, 4), torch.zeros(12, dtype=torch.long))
    seen: list[torch.device] = []

    def train(local: LocalRound):
        seen.append(local.device)
        inputs, targets = move_to(local.data.batch(local.next_batch(0)), local.device)
        local.model.zero_grad()
        local.loss(local.model(inputs), targets).backward()
        with torch.no_grad():
            for param in local.model.parameters():
                param.sub_(param.grad, alpha=local.lr)
        return LocalResult(0.0)

    model = torch.nn.Linear(4, 2)
    start = [p.detach().clone() for p in model.parameters()]
    trainer = LocalTrainer(Task(model=lambda: model, train_data=lambda _: data, train=train), model, data, seed=0,
                           device=torch.device(device))
    gradient, _ = trainer.train(start, local_steps=1, batch_size=0, lr=0.5)
    assert [d.type for d in seen] == [device]
    assert all(g.device.type == device for g in gradient)


# ------------------------------------------------------------------ the LBGM decision on the device


def _through_the_wire(encoded, round_number: int) -> list[pb.UpdatePart]:
    header = pb.UpdateHeader(worker_id=1, round=round_number, num_samples=10, train_loss=0.5)
    return list(update_parts(header, encoded.full, encoded.scalars))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_the_worker_keeps_as_its_lbg_exactly_what_the_server_decodes_from_the_bytes(compressor, device):
    """Round 1 sends everything, then nearly the same gradients go as scalars (decided against the
    device copy of the LBG), then a different one goes partly in full; after each round the server's
    mirrors (judge_update on the parsed bytes, on the CPU) equal the worker's committed LBGs bit for
    bit, and the worker's LBGs are CPU tensors."""
    shapes = [(24, 16), (24,), (3, 24), (3,)]
    rules = UploadRules(layer_shapes=tuple(shapes), units=tuple(decision_units(len(shapes), "layer")),
                        dense_dtype=torch.float32, codec=CODEC_OF[compressor])
    encoder = LbgmEncoder(rules.units, CompressorSettings(name=compressor), seed=5)
    generator = torch.Generator().manual_seed(11)
    base = [torch.randn(shape, generator=generator) for shape in shapes]
    mirrors = {}
    scalars = 0
    for round_number, wobble, delta in ((1, 0.05, 0.5), (2, 0.05, 0.95), (3, 0.05, 0.95), (4, 2.0, 0.5)):
        gradient = [(b + wobble * torch.randn(b.shape, generator=generator)).to(device) for b in base]
        encoded = encoder.encode(gradient, round_number, delta, wire_dtype=torch.float32, error_feedback=True)
        parts = iter(_through_the_wire(encoded, round_number))
        update = read_update_body(read_update_header(parts), parts, max_tensor_bytes=1 << 20)
        accepted = judge_update(update, round_number, rules, mirrors)
        encoder.commit(encoded)
        mirrors.update(accepted.new_mirrors)
        scalars += accepted.scalar_units
        assert sorted(mirrors) == sorted(encoder.lbgs)
        for unit, lbg in encoder.lbgs.items():
            assert mirrors[unit].version == lbg.version
            assert all(t.device.type == "cpu" for t in lbg.tensors)
            assert [tensor_to_bytes(t) for t in mirrors[unit].tensors] == [tensor_to_bytes(t) for t in lbg.tensors]
        for entry in encoded.scalars:  # what the server aggregates for a scalar is rho times its mirror
            assert torch.equal(accepted.gradient[entry.unit], rebuild(encoder.lbgs[entry.unit].tensors, entry.rho)[0])
        assert all(m.device.type == device for m in encoder.memory.values())  # the memory stays on the device
    assert scalars > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_compress_on_the_device_returns_the_cpu_payload_and_its_decoding(compressor, device):
    gradient = torch.randn(12, 10, generator=torch.Generator().manual_seed(2)).to(device)
    result = compress(CompressorSettings(name=compressor, lowrank_rank=2), gradient, None,
                      torch.Generator().manual_seed(0))
    assert all(part.device.type == "cpu" for part in result.parts)
    assert result.decoded.device.type == "cpu"
    assert torch.equal(result.decoded, decode(result.codec, result.parts, gradient.shape))
    if compressor == "none":
        assert torch.equal(result.decoded, gradient.cpu())


# ------------------------------------------------------------------ federations


def write_task(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "device_task.py"
    path.write_text(textwrap.dedent(DEVICE_TASK))
    return f"{path}:task"


def run_federation(tmp_path: Path, processes: list, compressor: str, server_device: str,
                   worker_devices: list[str]) -> None:
    """A server and one worker process per device over gRPC on localhost, with scalar updates; the
    server's mirrors must equal every worker's LBGs bit for bit (and be CPU tensors on both sides)."""
    task = write_task(tmp_path / "user")
    config = ExperimentConfig(name=f"devices-{compressor}", task=task, workers=len(worker_devices), rounds=6,
                              delta=0.6, local_steps=3, batch_size=32, local_lr=0.1, compressor=compressor,
                              error_feedback=True, round_timeout=60.0)
    server = start_server(tmp_path, config, extra_args=("--device", server_device))
    processes.append(server.process)
    state_dir = tmp_path / "state"
    names = [f"{device.replace(':', '')}-{index}" for index, device in enumerate(worker_devices)]
    workers = [start_worker(tmp_path, server.target, name, state_dir=state_dir,
                            extra_args=("--task", task, "--device", device))
               for name, device in zip(names, worker_devices)]
    processes.extend(workers)
    assert server.process.wait(timeout=180) == 0, server.log()
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["participants"]) == len(worker_devices) for r in records)
    assert sum(r["scalar_units"] for r in records) > 0
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    assert_mirrors_equal_worker_lbgs(server.run_dir, state_dir, names, 6)  # 6 parameter tensors
    for name in names:
        for lbg in lbgs_from_state(load(state_dir / f"{name}.lbg.pt")).values():
            assert all(t.device.type == "cpu" for t in lbg.tensors)


def test_a_federation_with_device_cpu_keeps_the_mirrors_bit_identical(tmp_path, processes):
    """`auto` is the CPU here; on a machine with CUDA this federation mixes a CPU and a GPU worker."""
    run_federation(tmp_path, processes, "qsgd", "cpu", ["cpu", "auto"])


@cuda
def test_local_federation_trains_and_evaluates_on_cuda(tmp_path):
    with local_federation(write_task(tmp_path / "user"), workers=2, rounds=3, device="cuda", server_device="cuda",
                          delta=0.6, local_steps=3, batch_size=32, local_lr=0.1) as result:
        assert result.summary["rounds_completed"] == 3
        logs = "".join(path.read_text() for path in (result.run_dir / "logs").glob("worker-*.log"))
        assert "training on cuda" in logs
        assert all(p.device.type == "cpu" for p in result.params)


@cuda
@pytest.mark.parametrize("compressor", ["none", "topk", "lowrank"])
def test_a_federation_mixing_cpu_and_cuda_workers_keeps_the_mirrors_bit_identical(tmp_path, processes, compressor):
    run_federation(tmp_path, processes, compressor, "cuda", ["cpu", "cuda", "cuda:0"])
