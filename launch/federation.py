"""A whole federation on one machine, as separate OS processes (`lbgm run`, sweeps, lbgm.testing).

One server process and P worker processes (the N workers spread over them as
virtual workers) talk real gRPC over 127.0.0.1. Each process logs to
<run>/logs/; this process shows a progress bar fed by the server's GetStatus
and prints the run summary at the end. `launch` takes a Placement, so
`lbgm lab` runs the same federation with each process in its own network
namespace.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from lbgm.experiment.config import ExperimentConfig, config_to_toml
from lbgm.common.grpc_options import CHANNEL_OPTIONS
from lbgm.launch.environment import environ_without_options, new_secret, secret_variable
from lbgm.server.accounting import format_summary
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc


class LaunchError(RuntimeError):
    """A child process failed to start or every worker died."""


class PlacementError(ValueError):
    """Workers and processes that do not fit together: the user's mistake, nothing was started."""


STARTUP_TIMEOUT_SECONDS = 120.0
# glibc malloc arenas per child (unless MALLOC_ARENA_MAX is set): by default each thread that allocates
# (a virtual worker training, a gRPC thread receiving an upload) gets an arena of its own that keeps what it
# freed, 10-25 MB each. A worker process training 5 virtual workers of the Flower job's CNN held 40 MB
# less anonymous memory with two arenas (382 -> 342 MB; 322 with one); results do not depend on it.
MALLOC_ARENAS = 2


def _lbgm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lbgm.cli", *args]


def _wait_for_port(port_file: Path, server: subprocess.Popen, log_path: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if server.poll() is not None:
            raise LaunchError(f"server exited with status {server.returncode} before listening:\n{_tail(log_path)}")
        time.sleep(0.1)
    raise LaunchError(f"server did not start listening within {STARTUP_TIMEOUT_SECONDS:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _partition_overview(path: Path, max_lines: int = 12) -> str:
    """The class summary the server wrote: whole when short, else its head and footer."""
    lines = path.read_text().splitlines()
    if len(lines) > max_lines:
        lines = [*lines[:max_lines - 2], f"... ({len(lines) - max_lines + 1} more lines in {path})", lines[-1]]
    return "\n".join(lines)


def worker_groups(workers: int, processes: int) -> list[int]:
    """How many virtual workers each process hosts (as even as possible)."""
    base, extra = divmod(workers, processes)
    return [base + (1 if index < extra else 0) for index in range(processes)]


@dataclass(frozen=True)
class WorkerProcess:
    """One worker OS process: its name, its virtual workers, and the command prefix that places it."""

    name: str
    virtual_workers: int
    prefix: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    """Where a federation's processes run. `lbgm run` keeps them all on 127.0.0.1; `lbgm lab` puts each
    behind `ip netns exec NS` and reaches the server's GetStatus through `status_route`, which maps the
    server's HOST:PORT to a target this process can dial while the context is open."""

    workers: tuple[WorkerProcess, ...]
    server_host: str = "127.0.0.1"
    server_prefix: tuple[str, ...] = ()
    server_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()  # further `lbgm worker` flags, the same for every worker process
    status_route: Callable[[str], AbstractContextManager[str]] = nullcontext


def run_federation(config: ExperimentConfig, out_dir: Path, processes: int, log_level: str,
                   log_format: str, resume: bool = False, server_args: Sequence[str] = (),
                   worker_args: Sequence[str] = ()) -> int:
    """`lbgm run`: the server and `processes` worker processes on this host; `resume` continues from the
    run folder's checkpoint; `server_args` and `worker_args` are further `lbgm server` and `lbgm worker` flags."""
    placement = local_placement(config.workers, processes, (*server_args, *(("--resume",) if resume else ())),
                                worker_args)
    return launch(config, out_dir, placement, log_level, "lbgm run", log_format)


def default_processes(workers: int) -> int:
    """Worker processes when none are asked for: one per core this process may run on but one, which the
    server's aggregation and evaluation use (at least one, at most one per worker). Each process pays the
    torch import (~0.35 GB) once for all its virtual workers. On 2 cores the Flower job (bench.footprint)
    ran as fast or faster in one worker process as in two (6.68 vs 6.67 s, 8.0 vs 9.9 s per round in two
    invocations), with fewer CPU-seconds and 0.33-0.37 GB less memory."""
    return min(workers, max(1, len(os.sched_getaffinity(0)) - 1))


def local_placement(workers: int, processes: int, server_args: Sequence[str] = (),
                    worker_args: Sequence[str] = ()) -> Placement:
    """Every process on 127.0.0.1: the `workers` spread over `processes` worker processes (0:
    default_processes)."""
    processes = processes or default_processes(workers)
    if not 1 <= processes <= workers:
        raise PlacementError(f"--processes must lie in [1, workers={workers}], got {processes}")
    groups = worker_groups(workers, processes)
    return Placement(tuple(WorkerProcess(f"proc{index}", count) for index, count in enumerate(groups)),
                     server_args=tuple(server_args), worker_args=tuple(worker_args))


@dataclass
class Federation:
    """A started federation: the server and worker processes, the address they talk on, the run folder."""

    server: subprocess.Popen
    workers: list[subprocess.Popen]
    target: str
    run_dir: Path

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [self.server, *self.workers]

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    def wait(self, poll: Callable[[], None] = lambda: None) -> None:
        """Until the server exits, calling poll() every half second; raises LaunchError as soon as every
        worker process failed (the server would wait for them until its round timeout)."""
        while self.server.poll() is None:
            poll()
            if self.workers and all(worker.poll() not in (None, 0) for worker in self.workers):
                raise LaunchError("every worker process failed; see the logs in the run folder")
            time.sleep(0.5)


def log_tails(logs: Path, lines: int = 15) -> str:
    """The last lines of every process's log in `logs`, each under its file name: what a failure shows."""
    return "\n".join(f"--- {path.name} (last {lines} lines)\n{_tail(path, lines)}"
                     for path in sorted(logs.glob("*.log")))


@contextmanager
def federation_processes(config: ExperimentConfig, out_dir: Path, placement: Placement, log_level: str = "INFO",
                         log_format: str = "text") -> Iterator[Federation]:
    """Writes <out_dir>/<name>/config.toml and starts the server and the workers, which log to <run>/logs/.
    On leaving, every process has exited: the workers get 15 s to finish by themselves after a normal exit,
    none after an exception; then what still runs is terminated, and killed after 10 s. The caller checks
    the task first (check_task, or launch.preflight in a process without torch): a task that does not load
    fails its server here."""
    run_dir = out_dir / config.name
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "port"):
        (run_dir / stale).unlink(missing_ok=True)
    config_path = run_dir / "config.toml"
    config_path.write_text(config_to_toml(config))
    port_file = run_dir / "port"

    children: list[subprocess.Popen] = []
    child_env = environ_without_options()  # children get every setting as a flag; no LBGM_* may change one
    # ...but a secret, which a flag would show to every local user: only this federation's workers may join.
    child_env[secret_variable("join-token")] = new_secret()
    child_env.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    grace_seconds = 0.0
    try:
        server_log = logs / "server.log"
        server = subprocess.Popen(
            [*placement.server_prefix,
             *_lbgm_command("server", "--config", str(config_path), "--host", placement.server_host, "--port", "0",
                            "--port-file", str(port_file), "--out-dir", str(out_dir), "--log-level", log_level,
                            "--log-format", log_format, *placement.server_args)],
            stdout=open(server_log, "w"), stderr=subprocess.STDOUT, env=child_env)
        children.append(server)
        port = _wait_for_port(port_file, server, server_log)
        target = f"{placement.server_host}:{port}"
        for index, process in enumerate(placement.workers):
            children.append(subprocess.Popen(
                [*process.prefix,
                 *_lbgm_command("worker", "--server", target, "--name", process.name,
                                "--virtual-workers", str(process.virtual_workers),
                                "--log-level", log_level, "--log-format", log_format,
                                "--data-dir", config.data_dir, "--task", config.task, *placement.worker_args)],
                stdout=open(logs / f"worker-{index}.log", "w"), stderr=subprocess.STDOUT, env=child_env))
        yield Federation(server, children[1:], target, run_dir)
        grace_seconds = 15.0
    finally:
        _stop_all(children, grace_seconds)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `timeout`, `kill`) stops like Ctrl-C: a KeyboardInterrupt unwinds the
    federation's context, which stops its processes. Python's default would end this process at once
    and leave the server and the workers running. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(config: ExperimentConfig, out_dir: Path, placement: Placement, log_level: str, label: str,
           log_format: str = "text") -> int:
    """Runs the federation to its end and prints its summary: 0, 1 (a process failed) or 130 (interrupted).
    The caller has checked the task (federation_processes)."""
    started = time.monotonic()
    try:
        with terminate_as_interrupt(), federation_processes(config, out_dir, placement, log_level,
                                                            log_format) as federation:
            print(f"{label}: server on {federation.target}, {config.workers} workers in {len(placement.workers)} "
                  f"processes; logs in {federation.logs}", file=sys.stderr)
            print(_partition_overview(federation.run_dir / "partition.txt"), file=sys.stderr)
            with placement.status_route(federation.target) as reachable:
                _follow(federation, reachable, config)
    except KeyboardInterrupt:
        print(f"{label}: interrupted; stopping all processes", file=sys.stderr)
        return 130
    if federation.server.returncode != 0:
        print(f"{label}: server failed with status {federation.server.returncode}:\n"
              f"{_tail(federation.logs / 'server.log')}", file=sys.stderr)
        return 1
    summary = json.loads((federation.run_dir / "summary.json").read_text())
    print(format_summary(summary, federation.run_dir, time.monotonic() - started))
    return 0


def _follow(federation: Federation, target: str, config: ExperimentConfig) -> None:
    """Progress bar, fed by the server's GetStatus, until the server exits."""
    with (grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel,
          tqdm(total=config.rounds, desc="rounds", unit="round", dynamic_ncols=True) as bar):
        stub = pb_grpc.AggregatorStub(channel)

        def show_status() -> None:
            try:
                status = stub.GetStatus(pb.StatusRequest(), timeout=2.0)
            except grpc.RpcError:
                return
            bar.n = status.completed_rounds
            accuracy = "-" if math.isnan(status.test_accuracy) else f"{status.test_accuracy:.4f}"
            bar.set_postfix_str(f"acc {accuracy}, workers {status.workers_joined}, "
                                f"up {status.uplink_bytes / 1e6:.1f} MB")

        federation.wait(show_status)
        if federation.server.returncode == 0:
            bar.n = bar.total
            bar.refresh()


def _stop_all(children: list[subprocess.Popen], grace_seconds: float) -> None:
    deadline = time.monotonic() + grace_seconds
    for child in children[1:]:  # workers exit by themselves once told training finished
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.terminate()
    for child in children:
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
