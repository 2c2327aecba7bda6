"""Evaluation on the server: putting a model state (what travels: parameters, then buffers) into a
model for the central evaluation, and averaging the workers' reports (federated evaluation)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lbgm.server.updates import UpdateRejected
from lbgm.v1 import lbgm_pb2 as pb


def load_state(model: nn.Module, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = ()) -> None:
    """Copy parameters (and buffers, e.g. BatchNorm statistics) into the model."""
    with torch.no_grad():
        for target, source in zip(model.parameters(), params, strict=True):
            target.copy_(source)
        for target, source in zip(model.buffers(), buffers, strict=True):
            target.copy_(source)


@dataclass(frozen=True)
class WorkerEvaluation:
    """One worker's evaluation of a global model on its held-out data (federated evaluation)."""

    num_samples: int  # 0: the worker has no held-out data (counts in no average)
    loss: float
    accuracy: float  # NaN: the task measures none
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class FederatedEvaluation:
    """The reports of one model version averaged with weights n_k / sum of n over the reports that
    carry the figure (a worker without accuracy, or without one of the task's metrics, counts in
    the other averages only)."""

    model_round: int  # the global model after this many rounds
    loss: float
    accuracy: float
    metrics: dict[str, float]
    num_samples: int
    workers: int  # reports with held-out data

    def as_record(self) -> dict:
        return {"model_round": self.model_round, "loss": self.loss, "accuracy": self.accuracy,
                "metrics": self.metrics, "num_samples": self.num_samples, "workers": self.workers}


def weighted_mean(pairs: Sequence[tuple[int, float]]) -> float:
    """sum n_k x_k / sum n_k over the pairs whose x_k is not NaN; NaN if none."""
    kept = [(n, x) for n, x in pairs if not math.isnan(x)]
    total = sum(n for n, _ in kept)
    return sum(n / total * x for n, x in kept) if total else math.nan


def aggregate_evaluations(model_round: int, reports: Sequence[WorkerEvaluation]) -> FederatedEvaluation:
    counted = [r for r in reports if r.num_samples > 0]
    names = sorted({name for r in counted for name in r.metrics})
    return FederatedEvaluation(
        model_round=model_round,
        loss=weighted_mean([(r.num_samples, r.loss) for r in counted]),
        accuracy=weighted_mean([(r.num_samples, r.accuracy) for r in counted]),
        metrics={name: weighted_mean([(r.num_samples, r.metrics.get(name, math.nan)) for r in counted])
                 for name in names},
        num_samples=sum(r.num_samples for r in counted),
        workers=len(counted),
    )


MAX_METRICS = 32
MAX_METRIC_NAME = 64


def checked_report(report: pb.EvaluationReport, max_samples: int) -> WorkerEvaluation:
    """A worker's EvaluationReport as a WorkerEvaluation, or UpdateRejected (MALFORMED) saying what is wrong:
    its sample count is its weight in the average, and one non-finite figure would poison the average."""
    def refuse(message: str) -> UpdateRejected:
        return UpdateRejected(pb.ErrorDetail.MALFORMED, f"evaluation of round {report.round}: {message}")

    if report.num_samples > max_samples:
        raise refuse(f"num_samples is {report.num_samples}, more than max_worker_samples ({max_samples})")
    if report.num_samples == 0:
        return WorkerEvaluation(0, math.nan, math.nan, {})
    if not math.isfinite(report.loss):
        raise refuse(f"loss is not finite: {report.loss}")
    if math.isinf(report.accuracy):
        raise refuse(f"accuracy is {report.accuracy} (a finite number, or NaN for none)")
    if len(report.metrics) > MAX_METRICS:
        raise refuse(f"{len(report.metrics)} metrics, at most {MAX_METRICS}")
    for name, value in report.metrics.items():
        if not 1 <= len(name) <= MAX_METRIC_NAME or not name.isprintable():
            raise refuse(f"metric name {name[:MAX_METRIC_NAME]!r} must be 1-{MAX_METRIC_NAME} printable characters")
        if not math.isfinite(value):
            raise refuse(f"metric {name!r} is not finite: {value}")
    return WorkerEvaluation(int(report.num_samples), report.loss, report.accuracy, dict(report.metrics))
