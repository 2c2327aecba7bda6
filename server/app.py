"""Assemble and run the aggregation server process: gRPC service, health,
reflection, and the round driver."""

from __future__ import annotations

import logging
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.grpc_options import SERVER_OPTIONS
from lbgm.common.tls import ServerTls, is_loopback
from lbgm.server.accounting import format_summary
from lbgm.server.callguard import CallGuard
from lbgm.server.limits import CallLimits
from lbgm.server.metrics import serve_metrics
from lbgm.server.rounds import Coordinator
from lbgm.server.service import RAW_REQUEST_METHODS, SERVICE_NAME, WORKER_METHODS, AggregatorService
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class BindError(OSError):
    """The server could not listen on the requested address."""


class ExposureError(ValueError):
    """The server would be reachable from other machines with nothing to tell workers from strangers."""


@dataclass(frozen=True)
class Access:
    """Who may do what: the transport, the enrollment secret a Join must carry, the secret that unlocks
    the state digest, and what one call may hold."""

    tls: ServerTls | None = None
    join_token: bytes | None = None
    operator_token: bytes | None = None
    limits: CallLimits = CallLimits()


def check_exposure(host: str, access: Access) -> None:
    """Off loopback, anyone who reaches the port could take a worker's slot by joining under its name, or
    take every free slot: refuse unless mutual TLS or a join token decides who is a worker."""
    if is_loopback(host) or (access.tls is not None and access.tls.mutual) or access.join_token is not None:
        return
    raise ExposureError(f"--host {host} is reachable from other machines, and nothing tells the workers from "
                        f"anyone else: give a join token (--join-token-file or LBGM_JOIN_TOKEN, and the same to "
                        f"every worker) or mutual TLS (--tls-client-ca) (docs/SECURITY.md)")


@dataclass(frozen=True)
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    guard: CallGuard

    def stop(self, grace: float = 2.0) -> None:
        """Say NOT_SERVING, let calls in flight finish for up to `grace` seconds, then cancel the rest."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace).wait()
        self.guard.close()


def start_server(coordinator: Coordinator, host: str, port: int, access: Access = Access()) -> RunningServer:
    """A started gRPC server serving the aggregator, grpc.health.v1 and reflection; plaintext without TLS."""
    check_exposure(host, access)
    tls = access.tls
    service = AggregatorService(coordinator, check_peer_names=tls is not None and tls.mutual,
                                join_token=access.join_token, operator_token=access.operator_token)
    guard = CallGuard(access.limits, WORKER_METHODS, service.admit, RAW_REQUEST_METHODS)
    # A worker runs at most one poll, one upload and one evaluation report at a time (AggregatorService.admit);
    # a few more threads end refused calls and the calls a newer one of the same worker is cancelling. Every
    # other call runs on the guard's own pool.
    threads = 3 * coordinator.config.workers + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
                         interceptors=[guard], options=SERVER_OPTIONS)
    pb_grpc.add_AggregatorServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address = f"{host}:{port}"
        bound = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.credentials)
    except RuntimeError as error:
        raise BindError(f"cannot listen on {host}:{port}: {error}") from None
    if bound == 0:
        raise BindError(f"cannot listen on {host}:{port} (address in use or not local?)")
    if tls is None and not is_loopback(host):
        log.warning("serving %s:%d WITHOUT TLS: anyone on the network can read the model, the tokens and the "
                    "join token, and then join as a worker", host, bound)
    log.info("transport: %s; joins %s; state digest %s", "plaintext" if tls is None else
             "mutual TLS" if tls.mutual else "TLS", "need the join token" if access.join_token else "are open",
             "needs the operator token" if access.operator_token else "is off")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health_servicer, guard)


def write_port_file(path: Path, port: int) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def serve(config: ExperimentConfig, host: str, port: int, run_dir: Path, port_file: Path | None = None,
          finish_grace_seconds: float = 10.0, access: Access = Access(), resume: bool = False,
          metrics_host: str = "127.0.0.1", metrics_port: int = 0, eval_device: torch.device = torch.device("cpu"),
          mirrors: str = "memory") -> dict:
    """Run a whole training job as the server (or the rest of it, resuming); returns the run summary.
    A nonzero `metrics_port` serves Prometheus metrics over HTTP until the gRPC server stops; the central
    evaluation runs on `eval_device`; `mirrors` says where the LBG mirrors live (memory or disk)."""
    check_exposure(host, access)  # before a fresh run clears the run folder
    coordinator = Coordinator(config, run_dir, resume, eval_device, mirrors)
    metrics_server = serve_metrics(coordinator.metrics.registry, metrics_host, metrics_port) if metrics_port else None
    running = start_server(coordinator, host, port, access)
    log.info("aggregator listening on %s:%d, waiting for %d workers; results in %s",
             host, running.port, config.effective_min_workers, run_dir)
    if port_file is not None:
        write_port_file(port_file, running.port)
    try:
        summary = coordinator.run()
        log.info("%s", format_summary(summary, run_dir, summary["wall_seconds"]))
        coordinator.wait_until_workers_told(finish_grace_seconds)
    finally:
        log.info("shutting down the gRPC server")
        running.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("server stopped")
    return summary
