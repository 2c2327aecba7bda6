"""Load: 100 virtual workers in 10 processes for 30 rounds while whole worker
processes (10% of the workers) are killed with SIGKILL and restarted at
random. The run must complete every round and the server's resident memory
must stop growing once every worker's mirrors exist."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

from lbgm.experiment.config import ExperimentConfig

from conftest import FAST, start_server, start_worker

PROCESSES = 10
PER_PROCESS = 10
CONFIG = ExperimentConfig(name="load", workers=PROCESSES * PER_PROCESS, rounds=30, delta=0.2,
                          **{**FAST, "round_timeout": 4.0, "checkpoint_every": 0})


def test_hundred_workers_with_random_crashes_complete_and_memory_plateaus(tmp_path, processes):
    server = start_server(tmp_path, CONFIG)
    processes.append(server.process)

    def launch(index: int) -> subprocess.Popen:
        worker = start_worker(tmp_path, server.target, f"host{index}", virtual_workers=PER_PROCESS,
                              extra_args=["--poll-seconds", "2"])
        processes.append(worker)
        return worker

    hosts = [launch(i) for i in range(PROCESSES)]
    chaos = random.Random(7)
    crashes = 0
    while server.process.poll() is None and crashes < 6:
        time.sleep(chaos.uniform(3, 6))
        victim = chaos.randrange(PROCESSES)
        hosts[victim].send_signal(signal.SIGKILL)
        hosts[victim].wait()
        crashes += 1
        time.sleep(chaos.uniform(1, 3))
        hosts[victim] = launch(victim)
    assert server.process.wait(timeout=600) == 0, server.log()
    for host in hosts:
        assert host.wait(timeout=60) == 0

    records = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, CONFIG.rounds + 1))
    assert crashes >= 3
    assert any(r["missing"] for r in records), "no round ever missed a killed worker"
    assert len(records[-1]["participants"]) >= CONFIG.workers - PER_PROCESS
    rss = [r["server_rss_bytes"] for r in records]
    print("server RSS by round (MB):", [round(value / 2**20) for value in rss])
    # The server's RSS climbs towards its plateau for about 15 rounds here (allocator arenas filling under
    # 100 workers and their crashes: rounds 4-10 measured 30-90 MB under rounds 10-30 at commits before and
    # after issue 18), so the last ten rounds are compared with the ten before them.
    settled = max(rss[10:20])
    assert max(rss[20:]) <= settled * 1.05 + 16 * 2**20, [round(v / 2**20) for v in rss]
