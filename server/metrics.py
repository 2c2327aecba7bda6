"""Prometheus metrics of the aggregation server (`lbgm server --metrics-port`).

Every `ServerMetrics` owns its own CollectorRegistry, never prometheus_client's
global one, so several servers in one process (tests, simulations) do not
collide. Two sources feed it:

- events, counted by the Coordinator at its byte-accounting points: bytes up
  and down by message kind (the same serialized sizes as metrics.jsonl),
  decision units, refused uploads, round durations; and per round record what
  delta = 0 would have sent each way, so a dashboard can chart the saving
  (1 - sum(lbgm_downlink_bytes_total) /
  lbgm_full_equivalent_bytes_total{direction="down"}; the uplink's alike).
  These counters start at zero when the server process starts, also after `--resume`;
- state, read at scrape time: round, rounds completed, workers registered, test
  accuracy and loss come from the same StatusReply `lbgm status` shows
  (`lbgm_rounds_completed_total` therefore continues from the checkpoint after
  a resume); resident memory and LBG mirror bytes are measured on each scrape.

A worker is *connected* when it started a call (Join, a GetTask long poll, an
upload) within the last `round_timeout + 60` seconds. A live worker never goes
quieter than that: an idle one re-polls at least every 30 s (the longest poll
the service grants), and a sampled one uploads before the round's deadline,
at most `round_timeout` after its task poll began (which may have waited up to
30 s for the round to open). A worker that crashed drops out once the window
has passed.

The endpoint is plain HTTP without authentication. It carries counts, sizes,
accuracy and memory figures, never tokens, names or model values; bound to a
non-loopback address, anyone who can reach it can read the run's progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lbgm.server.accounting import DOWNLINK_KINDS, full_equivalent_downlink_bytes, resident_memory_bytes
from lbgm.v1 import lbgm_pb2 as pb

log = logging.getLogger(__name__)

# From an MLP round on a laptop (tenths of a second) to a ResNet round on two CPU cores (minutes).
ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# lbgm.common.wire's kinds, the workers' evaluation reports, and refusals
UPLINK_KINDS = ("header", "full", "scalar", "buffer", "evaluation", "refused")
UNIT_KINDS = ("scalar", "full")
DIRECTIONS = ("up", "down")
REFUSAL_REASONS = tuple(name for name in pb.ErrorDetail.Reason.keys() if name != "REASON_UNSPECIFIED")
# Twice the longest long poll AggregatorService grants: an idle worker calls again well within it.
POLL_ALLOWANCE_SECONDS = 60.0


class StatusCollector(Collector):
    """Families read from a StatusReply at scrape time, so they always agree with `lbgm status`."""

    FAMILIES = (
        (GaugeMetricFamily, "lbgm_round_current", "round",
         "the round open now, or the last completed one between rounds"),
        (GaugeMetricFamily, "lbgm_rounds_planned", "total_rounds", "rounds the run trains for"),
        (CounterMetricFamily, "lbgm_rounds_completed", "completed_rounds",
         "rounds aggregated and evaluated, including those before a resume"),
        (GaugeMetricFamily, "lbgm_workers_registered", "workers_joined",
         "worker slots taken (a re-joining worker keeps its slot)"),
        (GaugeMetricFamily, "lbgm_test_accuracy", "test_accuracy",
         "accuracy of the last evaluated global model (NaN before the first evaluation): central on the server's "
         "test set, or federated (lbgm_federated_evaluation 1), the workers' held-out data weighted by sample counts"),
        (GaugeMetricFamily, "lbgm_test_loss", "test_loss",
         "loss of the last evaluated global model (NaN before the first evaluation); see lbgm_test_accuracy"),
        (GaugeMetricFamily, "lbgm_evaluated_model_round", "evaluated_model_round",
         "the global model lbgm_test_accuracy and lbgm_test_loss describe: the model after this many rounds"),
        (GaugeMetricFamily, "lbgm_federated_evaluation", "federated",
         "1 if lbgm_test_accuracy and lbgm_test_loss come from federated evaluation, 0 if central or none yet"),
    )

    def __init__(self, status: Callable[[], pb.StatusReply]) -> None:
        self._status = status

    def describe(self) -> Iterator[Metric]:
        """Names only: the registry must not call `status` while the Coordinator is being built."""
        for family, name, _, documentation in self.FAMILIES:
            yield family(name, documentation)

    def collect(self) -> Iterator[Metric]:
        reply = self._status()
        values = {"federated": float(reply.evaluation == "federated")}
        for family, name, field, documentation in self.FAMILIES:
            yield family(name, documentation, value=values[field] if field in values else getattr(reply, field))


class ServerMetrics:
    """The server's metrics in a registry of their own; one call per Coordinator accounting point."""

    def __init__(self, status: Callable[[], pb.StatusReply], mirror_bytes: Callable[[], int],
                 round_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self.connected_window_seconds = round_timeout + POLL_ALLOWANCE_SECONDS
        self._last_call: dict[int, float] = {}  # worker id -> clock() when its last call started
        self._lock = threading.Lock()
        registry = self.registry
        registry.register(StatusCollector(status))
        self._uplink = Counter("lbgm_uplink_bytes", "bytes uploaded by workers (serialized messages + 5-byte "
                               "gRPC frame prefix), by message kind; refused uploads under kind=refused",
                               ["kind"], registry=registry)
        self._downlink = Counter("lbgm_downlink_bytes", "bytes sent to workers, by message kind",
                                 ["kind"], registry=registry)
        self._units = Counter("lbgm_units_uploaded", "decision units of accepted uploads, sent as one scalar "
                              "or in full", ["kind"], registry=registry)
        self._downlink_units = Counter("lbgm_downlink_units", "decision units of the global updates broadcast, "
                                       "once per round (not per worker), as one scalar or in full",
                                       ["kind"], registry=registry)
        self._full_equivalent = Counter("lbgm_full_equivalent_bytes", "bytes delta = 0 would have sent in the "
                                        "recorded rounds, by direction: every participant's upload in full "
                                        "(up), the task with the whole float32 model to every worker that "
                                        "received a task, idle and finished replies as sent (down)",
                                        ["direction"], registry=registry)
        self._refused = Counter("lbgm_refused_uploads", "uploads refused, by ErrorDetail reason; UNAUTHENTICATED "
                                "counts every call refused for its credentials (join, poll, upload, state digest)",
                                ["reason"], registry=registry)
        self._round_seconds = Histogram("lbgm_round_duration_seconds", "from opening a round to its metrics "
                                        "record: waiting for uploads, aggregation, evaluation",
                                        buckets=ROUND_SECONDS_BUCKETS, registry=registry)
        self._clipped = Counter("lbgm_clipped_updates", "accepted updates with a layer beyond update_norm_bound "
                                "times the round's median norm, scaled down to the median", registry=registry)
        self._discarded = Counter("lbgm_discarded_rounds", "rounds whose new model was discarded by the round "
                                  "guard (non-finite, or test loss jumped); the previous model was kept",
                                  registry=registry)
        for counter, labels in ((self._uplink, UPLINK_KINDS), (self._downlink, DOWNLINK_KINDS),
                                (self._units, UNIT_KINDS), (self._downlink_units, UNIT_KINDS),
                                (self._full_equivalent, DIRECTIONS), (self._refused, REFUSAL_REASONS)):
            for label in labels:
                counter.labels(label)  # export zeros: a series that appears late breaks rate()
        Gauge("lbgm_workers_connected", f"workers that started a call within the last "
              f"{self.connected_window_seconds:g} seconds (round_timeout + {POLL_ALLOWANCE_SECONDS:g})",
              registry=registry).set_function(self._connected)
        Gauge("lbgm_server_resident_memory_bytes", "resident set size of the server process",
              registry=registry).set_function(resident_memory_bytes)
        Gauge("lbgm_mirror_bytes", "memory held by the server's copies of the workers' look-back gradients",
              registry=registry).set_function(mirror_bytes)

    def heard_from(self, worker_id: int) -> None:
        """A worker started a call: it counts as connected for the next window."""
        with self._lock:
            self._last_call[worker_id] = self._clock()

    def _connected(self) -> int:
        since = self._clock() - self.connected_window_seconds
        with self._lock:
            return sum(1 for started in self._last_call.values() if started >= since)

    def downlink(self, kind: str, count: int) -> None:
        self._downlink.labels(kind).inc(count)

    def accepted(self, bytes_by_kind: dict[str, int], scalar_units: int, full_units: int) -> None:
        for kind, count in bytes_by_kind.items():
            self._uplink.labels(kind).inc(count)
        self._units.labels("scalar").inc(scalar_units)
        self._units.labels("full").inc(full_units)

    def refused(self, reason: int, wire_bytes: int) -> None:
        """`reason` is a pb.ErrorDetail.Reason value; the refused bytes still crossed the wire."""
        self._uplink.labels("refused").inc(wire_bytes)
        self._refused.labels(pb.ErrorDetail.Reason.Name(reason)).inc()

    def round_recorded(self, record: dict[str, Any]) -> None:
        """A round's metrics.jsonl record: its duration, clipped and discarded updates, what delta = 0
        would have sent each way, and the downlink's decision units."""
        self._round_seconds.observe(record["round_seconds"])
        self._clipped.inc(record["clipped_updates"])
        self._discarded.inc(int(record["round_discarded"]))
        self._full_equivalent.labels("up").inc(record["full_equivalent_uplink_bytes"])
        self._full_equivalent.labels("down").inc(full_equivalent_downlink_bytes(record))
        self._downlink_units.labels("scalar").inc(record.get("downlink_scalar_units", 0))
        self._downlink_units.labels("full").inc(record.get("downlink_full_units", 0))


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve GET /metrics on a daemon thread; `shutdown()` on the result stops it."""
    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    log.info("Prometheus metrics on http://%s:%d/metrics (plain HTTP, no authentication)", host, server.server_port)
    return server
