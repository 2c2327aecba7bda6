"""`lbgm health`: one grpc.health.v1 Check against a server, for container healthchecks and
orchestrator probes. Exit status 0 when the server answers SERVING; 1 when it answers anything
else or cannot be reached (so Docker and Kubernetes count it as unhealthy); one line says which.
Usage mistakes (a missing certificate file) exit with 2, like every `lbgm` command."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbgm.cli.options import UsageError, add_log_level, configure_logging
from lbgm.cli.transport import add_client_tls_arguments, client_tls
from lbgm.common.tls import ChannelTls, open_channel

SERVING = health_pb2.HealthCheckResponse.SERVING


def add_parser(commands: argparse._SubParsersAction) -> None:
    health = commands.add_parser("health", help="check a server's grpc.health.v1 status (exit 0 if SERVING)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(health)


def add_arguments(health: argparse.ArgumentParser) -> None:
    health.add_argument("--server", required=True, help="aggregator address, HOST:PORT")
    health.add_argument("--service", default="",
                        help="service to check, e.g. lbgm.v1.Aggregator (default: '', the server as a whole)")
    health.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the answer (default: 5)")
    add_client_tls_arguments(health)
    add_log_level(health, default="WARNING")
    health.set_defaults(func=cmd_health)


def check(target: str, service: str, timeout: float, tls: ChannelTls | None) -> int:
    """The server's serving status for `service` (a HealthCheckResponse.ServingStatus value)."""
    with open_channel(target, tls) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


def cmd_health(args: argparse.Namespace) -> int:
    subject = f"{args.server} ({args.service or 'server'})"
    try:
        status = check(args.server, args.service, args.timeout, client_tls(args, args.tls_cert, args.tls_key))
    except grpc.RpcError as error:
        print(f"{subject}: unhealthy: {error.code().name}: {error.details()}")
        return 1
    print(f"{subject}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == SERVING else 1


def main(argv: list[str]) -> int:
    """`lbgm health ARGS` as the `lbgm` entry point runs it (lbgm.cli.entry): this module imports grpc and
    the TLS helpers only, not torch, so a container healthcheck every 30 s stays cheap."""
    parser = argparse.ArgumentParser(prog="lbgm health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return args.func(args)
    except (UsageError, OSError) as error:
        print(f"lbgm health: error: {error}", file=sys.stderr)
        return 2
