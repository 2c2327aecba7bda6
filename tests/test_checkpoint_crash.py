"""The server is killed (SIGKILL, a real process) at every step of a checkpoint
write, resumed with --resume, and the run finishes: every mirror is then
bit-identical to its worker's LBG, in memory (mirrors.pt) and in the committed
checkpoint, and the final model is bit-identical to an uninterrupted run's.

Error feedback is on, so a worker that kept the residual of a round the server
lost would send a different tensor when that round is redone. The steps are
found by running the job once uninterrupted with the fault trace on (see
lbgm.common.faults); each test then crashes a fresh run at one of them.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.faults import CRASH_AT, TRACE
from lbgm.common.state_files import content_digest, load
from lbgm.server.checkpoint import CheckpointStore

from conftest import FAST, start_server, start_worker
from test_recovery import free_port

CONFIG = ExperimentConfig(name="crash", workers=2, rounds=4, delta=0.8, error_feedback=True, **FAST)
WORKERS = ("w-0", "w-1")  # one worker process hosting both
# The last checkpoint, after round 4: it writes two LBG files and replaces two. Being the last, what
# the redone round 4 left in it is what the run ends with.
CRASHED_CHECKPOINT = 4
# Every step of that checkpoint write, numbered within it (the trace holds the process-wide count).
STEPS = (
    "checkpoint.begin#1",
    "checkpoint.lbg.begin#1", "checkpoint.lbg.temp-written#1", "checkpoint.lbg.renamed#1",
    "checkpoint.lbg.begin#2", "checkpoint.lbg.temp-written#2", "checkpoint.lbg.renamed#2",
    "checkpoint.manifest.temp-written#1", "checkpoint.manifest.renamed#1",
    "checkpoint.orphan.deleted#1", "checkpoint.orphan.deleted#2",
)


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set for the processes started inside the block."""
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in variables:
            del os.environ[name]


def run_job(folder: Path, processes: list, port: int, crash_at: str = "") -> None:
    """The whole job, its files in `folder`; with `crash_at` the first server process is killed at
    that step and a second one resumes the run. Returns once the run finished and everyone exited."""
    folder.mkdir()
    with environment({CRASH_AT: crash_at} if crash_at else {TRACE: str(folder / "trace")}):
        server = start_server(folder, CONFIG, port=port)
    processes.append(server.process)
    worker = start_worker(folder, server.target, "w", virtual_workers=2, state_dir=folder / "state",
                          extra_args=["--give-up-after", "120"])
    processes.append(worker)
    if crash_at:
        assert server.process.wait(timeout=120) == -signal.SIGKILL, server.log()
        server = start_server(folder, CONFIG, extra_args=["--resume"], port=port, log_name="resumed.log")
        processes.append(server.process)
    assert server.process.wait(timeout=120) == 0, server.log()
    assert worker.wait(timeout=60) == 0, (folder / "w.log").read_text()


def lbg_digests(lbgs: dict[int, dict]) -> dict[int, tuple[int, str]]:
    """unit -> (version, digest of the tensors' bits) of an LBG set as state_files stores it."""
    return {int(unit): (int(entry["version"]), content_digest(entry["tensors"])) for unit, entry in lbgs.items()}


def model_digest(run_dir: Path) -> str:
    final = load(run_dir / "final_model.pt")
    return content_digest([*final["params"], *final["buffers"]])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[str]]:
    """(run folder, every crash point the server passed) of the job run without a crash."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "job"
    processes: list = []
    try:
        run_job(folder, processes, free_port())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return folder, (folder / "trace").read_text().split()


def crash_target(trace: list[str], step: str) -> str:
    """`name:n` (n counted over the whole process) of step `name#i` of checkpoint CRASHED_CHECKPOINT."""
    name, _, index = step.partition("#")
    seen: Counter[str] = Counter()
    checkpoints = within = 0
    for point in trace:
        seen[point] += 1
        checkpoints += point == "checkpoint.begin"
        if checkpoints == CRASHED_CHECKPOINT and point == name:
            within += 1
            if within == int(index):
                return f"{name}:{seen[point]}"
    raise AssertionError(f"checkpoint {CRASHED_CHECKPOINT} has no step {step}")


def test_the_crashed_checkpoint_has_exactly_the_steps_tested(uninterrupted):
    _, trace = uninterrupted
    begins = [i for i, point in enumerate(trace) if point == "checkpoint.begin"]
    assert len(begins) == CONFIG.rounds == CRASHED_CHECKPOINT
    numbered: list[str] = []
    seen: Counter[str] = Counter()
    for point in trace[begins[CRASHED_CHECKPOINT - 1]:]:
        seen[point] += 1
        numbered.append(f"{point}#{seen[point]}")
    assert numbered == list(STEPS)


@pytest.mark.parametrize("step", STEPS)
def test_a_server_killed_at_any_checkpoint_step_resumes_with_every_mirror_equal_to_its_worker(
        step, uninterrupted, tmp_path, processes):
    reference, trace = uninterrupted
    folder = tmp_path / "job"
    run_job(folder, processes, free_port(), crash_at=crash_target(trace, step))
    run_dir = folder / "runs" / CONFIG.name
    assert "resumed from" in (folder / "resumed.log").read_text()

    workers = {name: lbg_digests(load(folder / "state" / f"{name}.lbg.pt")) for name in WORKERS}
    mirrors = {name: lbg_digests(lbgs) for name, lbgs in load(run_dir / "mirrors.pt").items()}
    assert mirrors == workers
    lbg_files = run_dir / "checkpoint" / "lbg"
    assert len(list(lbg_files.iterdir())) == sum(len(w) for w in workers.values())  # no orphan, no *.tmp
    state = CheckpointStore.of_run(run_dir).load(CONFIG)  # what a resume would hold; every file verified
    names = {worker_id: name for worker_id, name, _ in state.workers}
    committed = {names[w]: {u: (lbg.version, content_digest(lbg.tensors)) for u, lbg in entries.items()}
                 for w, entries in state.mirrors.items()}
    assert committed == workers
    # Full shards train deterministically, and the workers went back with the server: the resumed
    # run is the uninterrupted one, bit for bit.
    assert model_digest(run_dir) == model_digest(reference / "runs" / CONFIG.name)
