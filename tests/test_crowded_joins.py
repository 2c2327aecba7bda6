"""Workers ride out a busy or cancelling server: many virtual workers joining through a single
control-call slot all get in (refused ones retry with jittered backoff), and a long poll that the
server cancels is asked again instead of ending the worker."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
from pathlib import Path

import grpc

from lbgm.common.grpc_options import CHANNEL_OPTIONS, worker_metadata
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.app import Access, serve, start_server
from lbgm.server.limits import CallLimits
from lbgm.server.rounds import Coordinator
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.client import RetryPolicy, VirtualWorker, WorkerStopped, task_job

from conftest import FAST, lbgm
from test_hostile_transport import threads_in, wait_until

JOINERS = 24


def test_joiners_beyond_the_control_slots_retry_until_all_are_in(tmp_path: Path) -> None:
    config = ExperimentConfig(name="crowd", workers=JOINERS, rounds=1, **FAST)
    port_file = tmp_path / "port"
    summary: dict = {}
    server = threading.Thread(target=lambda: summary.update(serve(
        config, "127.0.0.1", 0, tmp_path / "run", port_file, finish_grace_seconds=5.0,
        access=Access(limits=CallLimits(control_calls=1)))), daemon=True)
    server.start()
    assert wait_until(port_file.exists, 30.0), "the server never listened"
    log_path = tmp_path / "workers.log"
    worker = subprocess.run(
        lbgm("worker", "--server", f"127.0.0.1:{port_file.read_text().strip()}", "--name", "crowd",
             "--virtual-workers", str(JOINERS), "--poll-seconds", "5", "--give-up-after", "60"),
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, timeout=120)
    server.join(timeout=60)
    log = log_path.read_text()
    assert worker.returncode == 0, log[-3000:]
    assert summary["rounds_completed"] == 1
    joined = set(re.findall(r"(crowd-\d+): joined as worker", log))
    assert len(joined) == JOINERS
    # The single slot really turned callers away, and they came back.
    assert "UNAVAILABLE: the server is already running 1 status, join" in log
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["sampled"]) == JOINERS and not record["missing"]


def test_a_poll_the_server_cancels_is_asked_again(tmp_path: Path, caplog) -> None:
    config = ExperimentConfig(name="cancel", workers=2, rounds=1, **FAST)
    coordinator = Coordinator(config, tmp_path / "run")  # no round driver: every poll waits its whole window
    running = start_server(coordinator, "127.0.0.1", 0)
    target = f"127.0.0.1:{running.port}"
    stop = threading.Event()
    worker = VirtualWorker("w", target, task_job(), poll_seconds=20.0, stop=stop,
                           retry=RetryPolicy(initial_seconds=0.1, max_seconds=0.2, give_up_seconds=30.0))
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            worker.run()
            ended.append(None)
        except BaseException as error:  # noqa: BLE001 - the test reports it
            ended.append(error)

    thread = threading.Thread(target=run, daemon=True)
    caplog.set_level(logging.WARNING, logger="lbgm.worker.client")
    try:
        thread.start()
        assert wait_until(lambda: threads_in("wait_for_task") == 1, 30.0), "the worker never polled"
        # A second poll under the worker's credentials makes the server cancel the worker's (LatestCalls).
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AggregatorStub(channel)
            request = pb.TaskRequest(worker_id=worker.worker_id, token=worker.token, max_wait_seconds=0)
            list(stub.GetTask(request, timeout=10, metadata=worker_metadata(worker.worker_id, worker.token)))
        # The cancelled worker polls again (after a short backoff) instead of ending.
        assert wait_until(lambda: "cannot poll for a task (CANCELLED" in caplog.text, 10.0), caplog.text
        assert wait_until(lambda: threads_in("wait_for_task") == 1, 10.0), "the worker did not poll again"
        assert thread.is_alive() and not ended
    finally:
        stop.set()
        running.stop(grace=0)
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(ended) == 1 and (ended[0] is None or isinstance(ended[0], WorkerStopped)), ended

