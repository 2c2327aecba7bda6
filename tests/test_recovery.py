"""Crashes of real processes (SIGKILL): a dead worker cannot stall a round and
takes its slot back when restarted; a killed server resumes from its last
checkpoint and the run finishes as if nothing had happened."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from lbgm.experiment.config import ExperimentConfig, config_to_toml
from lbgm.server.checkpoint import CheckpointStore
from lbgm.sim.federation import simulate

from conftest import FAST, lbgm, start_server, start_worker


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_rounds(run_dir: Path, count: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(records := read_records(run_dir)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} rounds after {timeout}s"
        time.sleep(0.1)
    return records


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DEADLINE = 6.0
WORKER_CRASH = ExperimentConfig(name="worker-crash", workers=3, rounds=8, delta=0.5,
                                **{**FAST, "round_timeout": DEADLINE})


def test_killed_worker_is_left_out_then_rejoins_with_its_identity(tmp_path, processes):
    server = start_server(tmp_path, WORKER_CRASH)
    processes.append(server.process)
    workers = {name: start_worker(tmp_path, server.target, name) for name in ("w0", "w1", "victim")}
    processes.extend(workers.values())
    wait_for_rounds(server.run_dir, 2)
    workers["victim"].send_signal(signal.SIGKILL)
    workers["victim"].wait()
    killed_after = len(read_records(server.run_dir))
    wait_for_rounds(server.run_dir, killed_after + 2)  # rounds go on without it, closed by the deadline
    restarted = start_worker(tmp_path, server.target, "victim")
    processes.append(restarted)
    assert server.process.wait(timeout=180) == 0, server.log()
    assert restarted.wait(timeout=30) == 0

    records = read_records(server.run_dir)
    assert [r["round"] for r in records] == list(range(1, WORKER_CRASH.rounds + 1))
    victim_id = next(int(line.split("as worker ")[1].split()[0]) for line in server.log().splitlines()
                     if "victim joined as worker" in line)
    orphaned = [r for r in records if victim_id in r["missing"]]
    assert orphaned, "no round closed without the killed worker"
    for record in orphaned:
        assert sorted(record["participants"]) == sorted(set(record["sampled"]) - {victim_id})
        assert record["round_seconds"] < DEADLINE + 5  # closed by the deadline, not stalled
    assert victim_id in records[-1]["participants"]  # back after the restart
    assert f"victim re-joined as worker {victim_id}" in server.log()


SERVER_CRASH = ExperimentConfig(name="server-crash", workers=2, rounds=10, delta=0.3, **FAST)


def test_server_killed_mid_run_resumes_and_finishes_like_an_uninterrupted_run(tmp_path, processes):
    port = free_port()
    server = start_server(tmp_path, SERVER_CRASH, port=port)
    processes.append(server.process)
    processes.extend(start_worker(tmp_path, server.target, f"w{i}", extra_args=["--give-up-after", "120"])
                     for i in range(2))
    wait_for_rounds(server.run_dir, 4)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    crashed_after = len(read_records(server.run_dir))

    # --auto-resume (what containers use) finds the checkpoint; --resume is covered below.
    resumed = start_server(tmp_path, SERVER_CRASH, extra_args=["--auto-resume"], port=port, log_name="resumed.log")
    processes.append(resumed.process)
    assert resumed.process.wait(timeout=240) == 0, resumed.log()
    assert all(worker.wait(timeout=60) == 0 for worker in processes[1:3])

    assert "resumed from" in resumed.log()
    worker_log = (tmp_path / "w0.log").read_text()
    assert "UNAVAILABLE" in worker_log and "retrying in" in worker_log  # backed off while the server was down
    assert "re-joining" in worker_log  # the new server process did not know its session token
    checkpointed = int(resumed.log().split("after round ")[1].split(":")[0])
    assert crashed_after - 1 <= checkpointed <= crashed_after  # at most the round in flight is lost
    records = read_records(resumed.run_dir)
    assert [r["round"] for r in records] == list(range(1, SERVER_CRASH.rounds + 1))
    summary = json.loads((resumed.run_dir / "summary.json").read_text())
    uninterrupted = simulate(SERVER_CRASH, evaluate_every_round=False).rounds[-1]["test_accuracy"]
    assert abs(summary["final_accuracy"] - uninterrupted) < 0.02, (summary["final_accuracy"], uninterrupted)


def test_resume_refuses_a_checkpoint_of_another_experiment(tmp_path, processes):
    config = ExperimentConfig(name="short", workers=1, rounds=2, **FAST)
    server = start_server(tmp_path, config)
    processes.append(server.process)
    processes.append(start_worker(tmp_path, server.target, "only"))
    assert server.process.wait(timeout=120) == 0, server.log()
    changed = ExperimentConfig(name="short", workers=1, rounds=2, **{**FAST, "local_lr": 0.1})
    config_path = tmp_path / "changed.toml"
    config_path.write_text(config_to_toml(changed))
    result = subprocess.run(lbgm("server", "--config", str(config_path), "--port", "0", "--resume",
                                 "--out-dir", str(tmp_path / "runs")), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "local_lr was 0.5, now 0.1" in result.stderr
    assert "Traceback" not in result.stderr
    assert (server.run_dir / "summary.json").exists()  # the finished run is untouched


def test_a_sweep_killed_mid_run_continues_that_run_from_its_checkpoint(tmp_path):
    """A whole sweep (its server and workers too) dies as on a reboot; starting it again resumes the
    unfinished run instead of repeating its rounds; a checkpoint of other settings is not resumed."""
    base = tmp_path / "base.toml"
    config = ExperimentConfig(name="long", workers=2, rounds=40, delta=0.5, **FAST)
    base.write_text(config_to_toml(config))
    runs = tmp_path / "runs"
    command = lbgm("sweep", "--config", str(base), "--grid", "seed=0", "--out-dir", str(runs),
                   "--processes", "1", "--log-level", "WARNING")
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = runs / "long-seed0"
    try:
        wait_for_rounds(run_dir, 3)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    assert not (run_dir / "summary.json").exists()
    store = CheckpointStore.of_run(run_dir)
    checkpointed = store.resumable_round(dataclasses.replace(config, name="long-seed0"))
    assert checkpointed is not None and 1 <= checkpointed < config.rounds
    assert store.resumable_round(dataclasses.replace(config, name="long-seed0", local_lr=0.1)) is None
    kept = read_records(run_dir)[:checkpointed]

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming long-seed0 from its checkpoint after round {checkpointed}" in again.stderr
    records = read_records(run_dir)
    assert [r["round"] for r in records] == list(range(1, config.rounds + 1))
    assert records[:checkpointed] == kept  # the checkpointed rounds were not trained again


GONE = ExperimentConfig(name="gone", workers=2, rounds=5, delta=0.5, **{**FAST, "round_timeout": DEADLINE})


def test_a_resume_goes_on_without_a_worker_gone_for_good_after_round_timeout(tmp_path, processes):
    port = free_port()
    server = start_server(tmp_path, GONE, port=port)
    processes.append(server.process)
    workers = {name: start_worker(tmp_path, server.target, name, extra_args=["--give-up-after", "120"])
               for name in ("stays", "gone")}
    processes.extend(workers.values())
    wait_for_rounds(server.run_dir, 2)
    for process in (server.process, workers["gone"]):
        process.send_signal(signal.SIGKILL)
        process.wait()

    resumed = start_server(tmp_path, GONE, extra_args=["--resume"], port=port, log_name="resumed.log")
    processes.append(resumed.process)
    assert resumed.process.wait(timeout=120) == 0, resumed.log()
    assert workers["stays"].wait(timeout=30) == 0
    assert f"resuming with 1 of 2 workers: the others did not re-join within round_timeout ({DEADLINE:.0f}s)" \
           in resumed.log()
    checkpointed = int(resumed.log().split("after round ")[1].split(":")[0])
    records = read_records(resumed.run_dir)
    assert [r["round"] for r in records] == list(range(1, GONE.rounds + 1))
    assert all(len(r["participants"]) == 1 for r in records[checkpointed:])


def test_resuming_a_finished_run_exits_within_round_timeout_with_its_summary(tmp_path, processes):
    config = ExperimentConfig(name="done", workers=1, rounds=2, **{**FAST, "round_timeout": DEADLINE})
    server = start_server(tmp_path, config)
    processes.append(server.process)
    processes.append(start_worker(tmp_path, server.target, "only"))
    assert server.process.wait(timeout=120) == 0, server.log()
    summary = json.loads((server.run_dir / "summary.json").read_text())

    started = time.monotonic()
    again = subprocess.run(lbgm("server", "--config", str(tmp_path / "config.toml"), "--port", "0", "--resume",
                                "--out-dir", str(tmp_path / "runs")), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < DEADLINE + 20  # the gone worker is waited for round_timeout at most
    assert "the run had already finished: 2 of 2 rounds completed, nothing left to train" in again.stderr
    resumed = json.loads((server.run_dir / "summary.json").read_text())
    assert {k: resumed[k] for k in ("rounds_completed", "final_accuracy", "uplink_bytes")} == \
           {k: summary[k] for k in ("rounds_completed", "final_accuracy", "uplink_bytes")}
