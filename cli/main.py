"""`lbgm`: run a whole federation locally, or one role (server, worker) per host.

  lbgm run                      server + N worker processes on this machine
  lbgm server --port 50051      the aggregator, for multi-host deployments
  lbgm worker --server H:P      one process hosting one or more virtual workers
  lbgm status --server H:P      round, workers, accuracy and bytes of a running server
  lbgm health --server H:P      exit 0 if the server's grpc.health.v1 says SERVING (container healthchecks)
  lbgm certs --out DIR          development CA and certificates for mutual TLS (docs/SECURITY.md)
  lbgm init-weights --out FILE  a task's initial model as a weights file, for `lbgm server --weights FILE`
  lbgm sweep / lbgm report      grids of runs, and their plots and tables
  lbgm lab --hosts 4            one run across network namespaces with capped links (root only)
  lbgm fetch-data --dataset D   download a data set's official files into --data-dir (needs network)
  lbgm analyze-gradients        how low-rank centralized training's gradients are
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from lbgm.cli.credentials import add_secret_arguments, read_secret
from lbgm.cli.options import EnvParser, UsageError, add_log_level, configure_logging, worker_names
from lbgm.cli.transport import (add_client_tls_arguments, add_server_tls_arguments, client_tls, server_tls,
                                worker_tls)
from lbgm.experiment.config import ConfigError, add_config_arguments, config_from_args
from lbgm.launch.federation import PlacementError, run_federation
from lbgm.launch.preflight import PreflightError, check_in_child
from lbgm.report.runs import ReportError
from lbgm.sweep.grid import SweepError
from lbgm.common.errors import DatasetError, TaskError
from lbgm.common.grpc_options import OPERATOR_TOKEN_KEY
from lbgm.common.tls import ChannelTls, open_channel
from lbgm.server import MIRROR_STORES
from lbgm.server.registry import check_worker_name
from lbgm.server.allocator import MAX_MMAP_THRESHOLD, pin_mmap_threshold
from lbgm.server.limits import CallLimits
from lbgm.tasks import BUILTIN_TASK
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # `lbgm run` and `lbgm status` never load torch (launch/preflight.py says why)
    import torch

log = logging.getLogger(__name__)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The `lbgm` parser. When argv names one of this module's commands (run, server, worker, status),
    the other commands' modules, several of which import torch, are not imported: their parsers would
    never be used (`lbgm run`'s process then holds no torch); otherwise (another command, `lbgm
    --help`) every command is there."""
    parser = argparse.ArgumentParser(prog="lbgm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=EnvParser)

    run = commands.add_parser("run", help="run a server and N workers as separate processes on localhost",
                              description="Start a server and worker processes on localhost over real gRPC, "
                                          "show progress, and print a summary at the end.")
    run.add_argument("--processes", type=int, default=0,
                     help="worker OS processes; workers are spread over them as virtual workers "
                          "(default: one per core this machine lets lbgm use but one, at least one, at most one per worker)")
    run.add_argument("--out-dir", type=Path, default=Path("runs"), help="parent folder of run folders (default: runs)")
    add_device_argument(run, "--device", "every worker's local training and LBGM decisions")
    add_device_argument(run, "--server-device", "the server's central evaluation")
    add_mirrors_argument(run)
    add_log_level(run)
    add_config_arguments(run)

    server = commands.add_parser("server", help="run the aggregation server", read_env=True,
                                 description="Run the aggregator; it trains for --rounds rounds, then exits. It "
                                             "builds the task's model and data (--task), or, with --weights FILE "
                                             "(from `lbgm init-weights`), holds that file's tensors only: no task "
                                             "code, no data, evaluation by the workers (docs/TASKS.md, A server "
                                             "without your code).")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default: 50051)")
    server.add_argument("--port-file", type=Path, help="write the bound port to this file once listening")
    server.add_argument("--out-dir", type=Path, default=Path("runs"), help="parent folder of run folders (default: runs)")
    server.add_argument("--resume", action="store_true",
                        help="continue the run <out-dir>/<name> from its last checkpoint (same experiment settings; "
                             "workers re-join by themselves) instead of starting afresh")
    server.add_argument("--auto-resume", action="store_true",
                        help="resume if <out-dir>/<name> holds a checkpoint, else start afresh: for containers "
                             "that a restart policy brings back after a crash")
    server.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: 0, disabled)")
    server.add_argument("--metrics-host",
                        help="address of the metrics endpoint: plain HTTP without authentication, exposing counts, "
                             "sizes and accuracy but no secrets (default: the --host address)")
    server.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="fix glibc's mmap threshold (e.g. 131072), so freed upload buffers go back to the OS "
                             "instead of staying in per-thread heaps: peak memory grows by about the mirrors alone "
                             "per worker, at the cost of longer rounds (docs/PERFORMANCE.md, Scale); "
                             "0 keeps glibc's adaptive threshold (default: 0)")
    add_device_argument(server, "--device", "the central evaluation")
    add_mirrors_argument(server)
    add_server_tls_arguments(server)
    access = server.add_argument_group("access", "who may join, who may read the state digest, and how long a "
                                                 "call may stall (docs/SECURITY.md)")
    add_secret_arguments(access, "join-token", "enrollment secret every Join must carry; required to listen off "
                                               "loopback without mutual TLS")
    add_secret_arguments(access, "operator-token", "secret that unlocks GetStatus(include_state_digest) "
                                                   "(default: the digest is off)")
    access.add_argument("--stall-timeout", type=float, default=CallLimits.stall_seconds, metavar="SECONDS",
                        help="cancel a call that waits longer than this for the client's next message, or for the "
                             f"client to take the server's (default: {CallLimits.stall_seconds:g})")
    add_log_level(server)
    add_config_arguments(server)

    worker = commands.add_parser("worker", help="run one worker process (one or more virtual workers)", read_env=True,
                                 description="Dial out to a server, join, and train until the server says it is done.")
    worker.add_argument("--server", required=True, help="aggregator address, HOST:PORT")
    worker.add_argument("--name", default=socket.gethostname(),
                        help="stable worker name (prefix when hosting several); re-using it after a restart "
                             "takes the same slot back (default: the host name)")
    worker.add_argument("--virtual-workers", type=int, default=1,
                        help="virtual workers in this process, each with its own channel, identity and LBG state "
                             "(default: 1)")
    worker.add_argument("--data-dir", default="", help="folder holding the data set named by the server, if not embedded")
    worker.add_argument("--task", default=BUILTIN_TASK,
                        help="the task this worker runs, package.module:name or path/to/file.py:name "
                             "(docs/TASKS.md); its model must match the server's (default: %(default)s)")
    worker.add_argument("--poll-seconds", type=float, default=20.0, help="long-poll window for tasks (default: 20)")
    worker.add_argument("--give-up-after", type=float, default=300.0,
                        help="seconds of an unreachable server before the worker exits (default: 300)")
    worker.add_argument("--state-dir", type=Path,
                        help="keep each virtual worker's LBGs here, so a restarted worker goes on sending scalars")
    worker.add_argument("--parallel-training", type=int, default=1,
                        help="virtual workers of this process that may train at the same time; each holds its own "
                             "activations, so memory grows with it (default: 1)")
    worker.add_argument("--torch-threads", type=int, default=1, help="intra-op threads for local training (default: 1)")
    add_device_argument(worker, "--device", "local training and the LBGM decisions")
    add_client_tls_arguments(worker).add_argument(
        "--tls-cert-dir", type=Path,
        help="folder of client certificates as `lbgm certs` writes them: the virtual worker named X presents "
             "X.crt with key X.key ('/' in X written as '_')")
    add_secret_arguments(worker.add_argument_group("access"), "join-token",
                         "the server's enrollment secret, sent with every Join")
    add_log_level(worker)

    status = commands.add_parser("status", help="show a running server's progress")
    status.add_argument("--server", required=True, help="aggregator address, HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--digest", action="store_true",
                        help="also print the state digest: SHA-256 over the model, the optimizer state, every LBG "
                             "mirror and the open round's accepted uploads (needs the operator token)")
    add_client_tls_arguments(status)
    add_secret_arguments(status.add_argument_group("access"), "operator-token", "the server's operator token")
    add_log_level(status)
    status.set_defaults(func=cmd_status)
    run.set_defaults(func=cmd_run)
    server.set_defaults(func=cmd_server)
    worker.set_defaults(func=cmd_worker)
    if argv[:1] and argv[0] in commands.choices:
        return parser
    from lbgm.cli import analyze, certs, fetch, health, lab, report, sweep, weights

    sweep.add_parser(commands)
    report.add_parser(commands)
    analyze.add_parser(commands)
    certs.add_parser(commands)
    health.add_parser(commands)
    lab.add_parser(commands)
    fetch.add_parser(commands)
    weights.add_parser(commands)
    return parser


def add_device_argument(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    parser.add_argument(flag, default="cpu", metavar="DEVICE",
                        help=f"torch device of {what}: auto (cuda if there is one, else mps, else cpu), cpu, cuda, "
                             "cuda:N or mps; a per-process choice, not an experiment setting: CPU and GPU "
                             "processes may mix in one federation (default: cpu)")


def add_mirrors_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mirrors", choices=MIRROR_STORES, default="memory",
                        help="where the server keeps the workers' look-back gradients: memory (K model copies in "
                             "RAM once every worker sent each layer in full), or disk (one file per LBG version "
                             "under <out-dir>/<name>/mirrors/, memory-mapped only while an upload is judged, so "
                             "RAM holds the open round's uploads instead; checkpoints hard-link these files). Not "
                             "an experiment setting: results are bit-identical, and a resume may change it "
                             "(default: memory)")


def device_option(name: str, flag: str) -> torch.device:
    """The device a --device flag names; a UsageError if this machine has no such device."""
    from lbgm.common.devices import DeviceError, local_device

    try:
        return local_device(name, flag)
    except DeviceError as error:
        raise UsageError(str(error)) from None


def cmd_server(args: argparse.Namespace) -> int:
    from lbgm.server.app import Access, check_exposure, serve
    from lbgm.common.weights import WeightsError
    from lbgm.server.checkpoint import CheckpointError, CheckpointStore

    if not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must lie in [0, 65535], got {args.metrics_port}")
    if not 0 <= args.malloc_mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise UsageError(f"--malloc-mmap-threshold must lie in [0, {MAX_MMAP_THRESHOLD}], "
                         f"got {args.malloc_mmap_threshold}")
    tls = server_tls(args)
    eval_device = device_option(args.device, "--device")
    config = config_from_args(args)
    run_dir = args.out_dir / config.name
    resume = args.resume or (args.auto_resume and CheckpointStore.of_run(run_dir).exists())
    try:
        access = Access(tls, read_secret(args, "join-token"), read_secret(args, "operator-token"),
                        CallLimits(stall_seconds=args.stall_timeout))
        check_exposure(args.host, access)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.malloc_mmap_threshold and not pin_mmap_threshold(args.malloc_mmap_threshold):
        log.warning("--malloc-mmap-threshold ignored: the C library is not glibc")
    try:
        serve(config, args.host, args.port, run_dir, args.port_file, access=access, resume=resume,
              metrics_host=args.metrics_host or args.host, metrics_port=args.metrics_port, eval_device=eval_device,
              mirrors=args.mirrors)
    except (CheckpointError, WeightsError) as error:
        raise UsageError(str(error)) from None
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import torch

    from lbgm.task.loader import check_reference
    from lbgm.worker.app import run_virtual_workers
    from lbgm.worker.client import RetryPolicy

    if args.virtual_workers < 1:
        raise UsageError(f"--virtual-workers must be >= 1, got {args.virtual_workers}")
    if args.parallel_training < 1:
        raise UsageError(f"--parallel-training must be >= 1, got {args.parallel_training}")
    if ":" not in args.server:
        raise UsageError(f"--server must look like HOST:PORT, got {args.server!r}")
    if not (math.isfinite(args.poll_seconds) and args.poll_seconds >= 0):
        raise UsageError(f"--poll-seconds must be a finite number >= 0, got {args.poll_seconds}")
    check_reference(args.task)
    names = worker_names(args.name, args.virtual_workers)
    try:
        check_worker_name(names[-1])  # the longest name
    except ValueError as error:
        raise UsageError(f"--name: {error}") from None
    device = device_option(args.device, "--device")
    tls = worker_tls(args, names)
    join_token = read_secret(args, "join-token")
    torch.set_num_threads(max(1, args.torch_threads))
    return run_virtual_workers(args.server, names, args.data_dir, args.poll_seconds,
                               RetryPolicy(give_up_seconds=args.give_up_after), args.state_dir, tls,
                               args.parallel_training, join_token, args.task, device)


def fetch_status(target: str, timeout: float = 5.0, tls: ChannelTls | None = None,
                 operator_token: bytes | None = None) -> pb.StatusReply:
    """The server's status; with `operator_token`, its state digest too."""
    metadata = ((OPERATOR_TOKEN_KEY, operator_token),) if operator_token is not None else None
    with open_channel(target, tls) as channel:
        return pb_grpc.AggregatorStub(channel).GetStatus(
            pb.StatusRequest(include_state_digest=operator_token is not None), timeout=timeout, metadata=metadata)


def cmd_status(args: argparse.Namespace) -> int:
    operator_token = read_secret(args, "operator-token")
    if args.digest and operator_token is None:
        raise UsageError("--digest needs the operator token: --operator-token or --operator-token-file")
    try:
        status = fetch_status(args.server, tls=client_tls(args, args.tls_cert, args.tls_key),
                              operator_token=operator_token if args.digest else None)
    except grpc.RpcError as error:
        raise UsageError(f"cannot reach {args.server}: {error.code().name}: {error.details()}") from None
    fields = {
        "round": status.round, "completed_rounds": status.completed_rounds, "total_rounds": status.total_rounds,
        "workers_joined": status.workers_joined, "test_accuracy": status.test_accuracy,
        "test_loss": status.test_loss, "evaluation": status.evaluation,
        "evaluated_model_round": status.evaluated_model_round, "uplink_bytes": status.uplink_bytes,
        "downlink_bytes": status.downlink_bytes, "finished": status.finished,
        **({"state_digest": status.state_digest} if args.digest else {}),
    }
    if args.json:
        print(json.dumps(fields))
    else:
        for key, value in fields.items():
            print(f"{key:>17}: {value}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # The devices exist, the weights file reads and the task builds its model: checked in a child that
    # loads torch, before anything starts or the run folder is touched (the processes resolve their own).
    check_in_child(config, [(args.device, "--device"), (args.server_device, "--server-device")])
    return run_federation(config, args.out_dir, args.processes, args.log_level, args.log_format,
                          server_args=("--device", args.server_device, "--mirrors", args.mirrors),
                          worker_args=("--device", args.device))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command != "run":
        configure_logging(args.log_level, args.log_format)
    try:
        return args.func(args)
    except (UsageError, ConfigError, TaskError, DatasetError, PlacementError, PreflightError, ReportError,
            SweepError, OSError) as error:
        print(f"lbgm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a failed child process or server: no traceback, its log says more
        print(f"lbgm {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lbgm {args.command}: interrupted", file=sys.stderr)
        return 130
