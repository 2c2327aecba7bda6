"""Assemble and run the aggregation server process: gRPC service, health,
reflection, and the round driver."""

from __future__ import annotations

import logging
import os
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lbgm.common.config import ExperimentConfig
from lbgm.common.grpc_options import SERVER_OPTIONS
from lbgm.common.tls import ServerTls, is_loopback
from lbgm.server.metrics import serve_metrics
from lbgm.server.rounds import Coordinator
from lbgm.server.service import AggregatorService
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name


class BindError(OSError):
    """The server could not listen on the requested address."""


def start_server(coordinator: Coordinator, host: str, port: int,
                 tls: ServerTls | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started gRPC server serving the aggregator, grpc.health.v1 and reflection; plaintext without `tls`."""
    # Every worker holds one thread while it long-polls for a task and one while uploading.
    threads = 2 * coordinator.config.workers + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
                         options=SERVER_OPTIONS)
    service = AggregatorService(coordinator, check_peer_names=tls is not None and tls.mutual)
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
        log.warning("serving %s:%d WITHOUT TLS: anyone on the network can read the model and join as any worker",
                    host, bound)
    log.info("transport: %s", "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def write_port_file(path: Path, port: int) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def serve(config: ExperimentConfig, host: str, port: int, run_dir: Path, port_file: Path | None = None,
          finish_grace_seconds: float = 10.0, tls: ServerTls | None = None, resume: bool = False,
          metrics_host: str = "127.0.0.1", metrics_port: int = 0) -> dict:
    """Run a whole training job as the server (or the rest of it, resuming); returns the run summary.
    A nonzero `metrics_port` serves Prometheus metrics over HTTP until the gRPC server stops."""
    coordinator = Coordinator(config, run_dir, resume)
    metrics_server = serve_metrics(coordinator.metrics.registry, metrics_host, metrics_port) if metrics_port else None
    server, bound, health_servicer = start_server(coordinator, host, port, tls)
    log.info("aggregator listening on %s:%d, waiting for %d workers; results in %s",
             host, bound, config.effective_min_workers, run_dir)
    if port_file is not None:
        write_port_file(port_file, bound)
    try:
        summary = coordinator.run()
        coordinator.wait_until_workers_told(finish_grace_seconds)
    finally:
        log.info("shutting down the gRPC server")
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=2.0).wait()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("server stopped")
    return summary
