"""`lbgm server --mirrors disk`: the LBG mirrors live in files, one per version, and give the same run
bit for bit as mirrors in RAM, also across a server killed (SIGKILL) and resumed from its checkpoint,
whose LBG files are hard links to the mirror files instead of copies.

The federations are real: server and worker processes over gRPC, half the workers sampled per round,
delta high enough that some rounds send scalars only.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from lbgm.common.faults import CRASH_AT
from lbgm.common.lookback import LookbackGradient
from lbgm.common.state_files import content_digest, lbgs_from_state, load
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.checkpoint import CheckpointStore
from lbgm.server.mirrors import DiskMirrorStore, LbgFile, MirrorStore

from conftest import FAST, start_server, start_worker
from test_checkpoint_crash import environment
from test_recovery import free_port

CONFIG = ExperimentConfig(name="disk-mirrors", workers=4, fraction=0.5, rounds=5, delta=0.9, checkpoint_every=1,
                          **FAST)
# Killed right after the manifest of the checkpoint after round 3 is committed: rounds 4 and 5 are redone.
CRASH = "checkpoint.manifest.renamed:3"


def entries(seed: int, version: int) -> dict[int, dict[int, LookbackGradient]]:
    generator = torch.Generator().manual_seed(seed)
    return {worker: {unit: LookbackGradient((torch.randn(30, 7, generator=generator),), version) for unit in range(2)}
            for worker in (1, 2)}


def test_disk_and_memory_stores_hold_the_same_entries_and_only_the_current_files(tmp_path):
    memory, disk = MirrorStore(), DiskMirrorStore(tmp_path / "mirrors")
    for version, seed in ((1, 0), (3, 1)):
        for worker, lbgs in entries(seed, version).items():
            memory.replace(worker, lbgs)
            disk.replace(worker, lbgs)
        assert disk.digest() == memory.digest()
    assert disk.nbytes() == memory.nbytes() == 2 * 2 * 30 * 7 * 4
    for worker in (1, 2):
        assert disk.versions(worker) == memory.versions(worker) == {0: 3, 1: 3}
        for unit, lbg in disk.of_worker(worker).items():
            assert torch.equal(lbg.tensors[0], memory.get(worker, unit).tensors[0])
    names = {LbgFile(w, u, 3, content_digest(lbg.tensors)).name for w, lbgs in entries(1, 3).items()
             for u, lbg in lbgs.items()}
    assert {path.name for path in (tmp_path / "mirrors").iterdir()} == names  # version 1's files are gone


def run_job(folder: Path, processes: list, mirrors: str, crash_at: str = "") -> Path:
    """The whole job with `--mirrors MIRRORS`; with `crash_at` the first server is killed at that step
    and a second one resumes the run. Returns the run folder once everyone exited."""
    folder.mkdir()
    port = free_port()
    args = ["--mirrors", mirrors]
    with environment({CRASH_AT: crash_at} if crash_at else {}):
        server = start_server(folder, CONFIG, extra_args=args, port=port)
    processes.append(server.process)
    worker = start_worker(folder, server.target, "w", virtual_workers=CONFIG.workers, state_dir=folder / "state",
                          extra_args=["--give-up-after", "120"])
    processes.append(worker)
    if crash_at:
        assert server.process.wait(timeout=120) == -signal.SIGKILL, server.log()
        server = start_server(folder, CONFIG, extra_args=[*args, "--resume"], port=port, log_name="resumed.log")
        processes.append(server.process)
    assert server.process.wait(timeout=120) == 0, server.log()
    assert worker.wait(timeout=60) == 0, (folder / "w.log").read_text()
    return server.run_dir


def outcome(run_dir: Path) -> tuple[str, bytes, dict]:
    """(final model digest, MirrorStore digest of the final mirrors by worker id, per-entry digests)."""
    final = load(run_dir / "final_model.pt")
    ids = {name: worker_id for worker_id, name, _ in CheckpointStore.of_run(run_dir).load(CONFIG).workers}
    store = MirrorStore()
    for name, state in load(run_dir / "mirrors.pt").items():
        store.replace(ids[name], lbgs_from_state(state))
    per_entry = {(w, u): (lbg.version, content_digest(lbg.tensors)) for w in ids.values()
                 for u, lbg in store.of_worker(w).items()}
    return content_digest([*final["params"], *final["buffers"]]), store.digest(), per_entry


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory) -> Path:
    processes: list = []
    try:
        return run_job(tmp_path_factory.mktemp("memory") / "job", processes, "memory")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_disk_mirrors_give_the_run_in_memory_bit_for_bit(in_memory, tmp_path, processes):
    run_dir = run_job(tmp_path / "job", processes, "disk")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["scalar_units"] for r in records) and all(len(r["sampled"]) == 2 for r in records)
    assert outcome(run_dir) == outcome(in_memory)
    # The mirror folder holds exactly the current entries, and the checkpoint's LBG files are the same files.
    mirror_files = {path.name: path for path in (run_dir / "mirrors").iterdir()}
    checkpoint_files = {path.name: path for path in (run_dir / "checkpoint" / "lbg").iterdir()}
    current = {LbgFile(w, u, version, digest).name for (w, u), (version, digest) in outcome(run_dir)[2].items()}
    assert mirror_files.keys() == checkpoint_files.keys() == current
    assert all(mirror_files[name].samefile(checkpoint_files[name]) for name in current)


def test_disk_mirrors_killed_and_resumed_give_the_uninterrupted_run(in_memory, tmp_path, processes):
    run_dir = run_job(tmp_path / "job", processes, "disk", crash_at=CRASH)
    assert "resumed from" in (tmp_path / "job" / "resumed.log").read_text()
    assert outcome(run_dir) == outcome(in_memory)
