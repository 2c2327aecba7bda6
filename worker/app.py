"""A worker process: hosts one or more virtual workers, each in a thread."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc
import torch

from lbgm.common.tls import ChannelTls
from lbgm.task.loader import BUILTIN_TASK
from lbgm.worker.client import ModelMismatch, RetryPolicy, VirtualWorker, WorkerStopped, task_job

log = logging.getLogger(__name__)


def run_virtual_workers(target: str, names: list[str], data_dir: str = "", poll_seconds: float = 20.0,
                        retry: RetryPolicy = RetryPolicy(), state_dir: Path | None = None,
                        tls: Mapping[str, ChannelTls] | None = None, parallel_training: int = 1,
                        join_token: bytes | None = None, task: str = BUILTIN_TASK,
                        device: torch.device = torch.device("cpu")) -> int:
    """Run every named virtual worker until training finishes; 0 if all ended cleanly.

    At most `parallel_training` of them train at the same moment: their uploads and downloads
    overlap freely, but each concurrent training holds its own activations, so unbounded
    concurrency multiplies peak memory by the number of virtual workers (and thrashes the caches).

    With `tls` every worker dials over TLS with the credentials under its name (with mutual TLS,
    its own client certificate); without, all dial plaintext. `join_token` is the server's
    enrollment secret, if it has one. `task` is the reference of the task every virtual worker runs,
    training and deciding on `device`.
    """
    stop = threading.Event()
    failures: list[str] = []

    def run_one(worker: VirtualWorker) -> None:
        try:
            stats = worker.run()
            log.info("%s: done after %d rounds (%d full, %d scalar units, %d stale resends)", worker.name,
                     stats.rounds, stats.full_units, stats.scalar_units, stats.stale_resends)
        except WorkerStopped:
            log.info("%s: stopped", worker.name)
        except Exception as error:  # noqa: BLE001 - one failing virtual worker must not hide the others
            failures.append(worker.name)
            expected = isinstance(error, (ConnectionError, grpc.RpcError, ModelMismatch))  # the message says it all
            log.error("%s: %s", worker.name, error, exc_info=not expected)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    training_slots = threading.BoundedSemaphore(parallel_training)
    job = task_job(task, data_dir, device)
    log.info("training on %s", device)
    workers = [VirtualWorker(name, target, job, poll_seconds, retry, stop, state_dir,
                             tls[name] if tls is not None else None, training_slots, join_token)
               for name in names]
    threads = [threading.Thread(target=run_one, args=(w,), name=w.name) for w in workers]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.5)
    if failures:
        log.error("%d of %d virtual workers failed: %s", len(failures), len(names), failures)
    return 1 if failures else 0
