"""Where the system's own CPU time goes per round, and the fix the profile led to.

Times, in this one process and without a network, every step a round adds on
top of local training, for the CNN and a realistic round (K workers, every
layer in full: the most expensive round for these steps):

- worker: LbgmEncoder.encode (phase decision, LBG bookkeeping) and encoding
  the upload for gRPC;
- server: parsing every upload (read_update_body from the messages' raw bytes,
  as SubmitUpdate does), judging and
  rebuilding it (judge_update against the worker's mirrors), aggregating K
  gradients with the server optimizer, and encoding the next model download.

Each step reports its median seconds over --repeats, and cProfile's top
functions by own time over the whole loop show what dominates.

Before/after, each timed here side by side for a CNN upload and for 10M values:

- uplink encoding: the uplink used to be built as protobuf messages and
  serialized by the generated stub (update_parts + SerializeToString: the
  tensor's bytes were copied four times); the worker now hands gRPC
  serialized_update_parts, built straight from tensor memory.
- NaN/Inf check: the server checked every uploaded layer with
  torch.isfinite(t).all(), which builds a boolean mask first and was the top
  function of the profile; all_finite reads the layer's extremes in one pass.
- upload parsing: the server parsed every part as a message (FromString copies
  the chunk, reading its data field copies it again) before copying the data
  into the payload's buffer; it now reads each chunk from the message's raw
  bytes and copies it once, into a buffer left unwritten until then
  (lbgm.common.codec.receive_buffer). bench.ingest measures the whole path
  under concurrent uploads.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.tasks.datasets import DATASET_SHAPES
from lbgm.common.lookback import aggregation_weights, all_finite, server_sgd_step, weighted_sum
from lbgm.common.model_spec import describe_model
from lbgm.tasks.models import build_model
from lbgm.common.wire import (
    EncodedTensor, FullLayer, read_update_body, read_update_header, serialized_update_parts, task_parts, update_parts,
)
from lbgm.server.rounds import upload_rules
from lbgm.server.updates import judge_update
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker.encoder import LbgmEncoder

from bench.common import markdown_table, median, run_info, run_main, write_json

LARGE_FLOATS = 10_000_000


def timed_median(call: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return median(timings)


def round_steps(model_name: str, workers: int) -> dict[str, Callable[[], object]]:
    """Closures for each per-round step of `workers` all-full uploads of `model_name`."""
    config = ExperimentConfig(model=model_name, dataset="mnist", workers=workers)
    model = build_model(model_name, 0, DATASET_SHAPES["mnist"], 10)
    rules = upload_rules(config, describe_model(model))
    params = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(workers)]
    encoder = LbgmEncoder(rules.units)
    header = pb.UpdateHeader(worker_id=1, token=bytes(16), round=1, num_samples=600, train_loss=1.0)
    encoded = encoder.encode(gradients[0], 1, 0.2, torch.float32)
    serialized = list(serialized_update_parts(header, encoded.full, encoded.scalars))

    def parse() -> object:
        return read_raw(serialized)

    received = parse()
    accepted = [judge_update(received, 1, rules, {}) for _ in range(workers)]
    weights = aggregation_weights([600] * workers)
    return {
        "worker: encode (LBGM decision)": lambda: encoder.encode(gradients[1], 1, 0.2, torch.float32),
        "worker: serialize upload": lambda: list(serialized_update_parts(header, encoded.full, encoded.scalars)),
        f"server: parse {workers} uploads": lambda: [parse() for _ in range(workers)],
        f"server: judge {workers} uploads": lambda: [judge_update(received, 1, rules, {})
                                                                 for _ in range(workers)],
        f"server: aggregate {workers} gradients (rho x LBG built here) + optimizer step": lambda: server_sgd_step(
            params, weighted_sum([a.gradient for a in accepted], weights), None, 1.0, 0.9),
        "server: encode the model download": lambda: list(task_parts(
            pb.RoundTask(round=1), [EncodedTensor.of(p) for p in params])),
    }


def read_raw(serialized: list[bytes]) -> object:
    """An upload read as SubmitUpdate reads it: from each message's raw bytes."""
    stream = iter(serialized)
    return read_update_body(read_update_header(stream), stream, 1 << 30)


def read_parsed(serialized: list[bytes]) -> object:
    """An upload read as SubmitUpdate used to: every message parsed first (FromString)."""
    stream = (pb.UpdatePart.FromString(data) for data in serialized)
    return read_update_body(read_update_header(stream), stream, 1 << 30)


def fixes(tensor: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """For each fix the profile led to, the old and the new code on one dense upload."""
    header = pb.UpdateHeader(worker_id=1, token=bytes(16), round=1, num_samples=1)
    full = [FullLayer.dense(0, 1, tensor)]
    serialized = list(serialized_update_parts(header, full, []))
    return {
        "upload parsing": {
            "before: FromString each part, then read": lambda: read_parsed(serialized),
            "after: read the raw bytes": lambda: read_raw(serialized),
        },
        "uplink encoding": {
            "before: messages + SerializeToString":
                lambda: [p.SerializeToString() for p in update_parts(header, full, [])],
            "after: serialized_update_parts": lambda: list(serialized_update_parts(header, full, [])),
        },
        "NaN/Inf check": {
            "before: torch.isfinite(t).all()": lambda: bool(torch.isfinite(tensor).all()),
            "after: all_finite (aminmax)": lambda: all_finite(tensor),
        },
    }


def top_functions(steps: dict[str, Callable[[], object]], repeats: int, count: int) -> list[dict[str, Any]]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        for step in steps.values():
            step()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:count]  # type: ignore[attr-defined]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_seconds": own,
             "cumulative_seconds": cumulative}
            for (file, line, name), (_, calls, own, cumulative, _) in rows]


def measure(model_name: str, workers: int, repeats: int, top: int) -> dict[str, Any]:
    steps = round_steps(model_name, workers)
    large = torch.randn(LARGE_FLOATS)
    cnn_upload = torch.cat([p.reshape(-1) for p in build_model(model_name, 0, DATASET_SHAPES["mnist"], 10)
                            .parameters()]).detach()
    comparisons = []
    for label, tensor in ((f"{model_name} upload", cnn_upload), (f"{LARGE_FLOATS:,} floats", large)):
        megabytes = tensor.numel() * 4 / 1e6
        for fix, variants in fixes(tensor).items():
            for name, call in variants.items():
                seconds = timed_median(call, repeats)
                comparisons.append({"fix": fix, "payload": label, "variant": name, "seconds": seconds,
                                    "mb_per_s": megabytes / seconds})
    return {
        "model": model_name, "workers": workers, "repeats": repeats,
        "steps": [{"step": name, "seconds": timed_median(call, repeats)} for name, call in steps.items()],
        "fixes": comparisons,
        "top_functions": top_functions(steps, repeats, top),
    }


def verdict(results: list[dict[str, Any]]) -> str:
    """One line for the document's summary: each fix, before vs after."""
    lines = []
    for result in results:
        speeds: dict[tuple[str, str], dict[str, float]] = {}
        for e in result["fixes"]:
            speeds.setdefault((e["fix"], e["payload"]), {})[e["variant"].split(":")[0]] = e["mb_per_s"]
        lines += [f"{fix}, {payload}: {mb['before']:,.0f} -> {mb['after']:,.0f} MB/s "
                  f"({mb['after'] / mb['before']:.1f}x)" for (fix, payload), mb in speeds.items()]
    return "Before -> after the fixes: " + "; ".join(lines) + "."


def table(results: list[dict[str, Any]]) -> str:
    parts = []
    for result in results:
        parts.append(markdown_table(["per-round step", "median seconds"],
                                    [[s["step"], f"{s['seconds']:.4f}"] for s in result["steps"]]))
        parts.append(markdown_table(["fix", "payload", "code", "median seconds", "MB/s"],
                                    [[e["fix"], e["payload"], e["variant"], f"{e['seconds']:.4f}",
                                      f"{e['mb_per_s']:,.0f}"] for e in result["fixes"]]))
        parts.append(markdown_table(["function (cProfile, by own time)", "calls", "own s", "cumulative s"],
                                    [[f"`{f['function']}`", f["calls"], f"{f['own_seconds']:.3f}",
                                      f"{f['cumulative_seconds']:.3f}"] for f in result["top_functions"]]))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run from the repository root. "
                                            "Example: python -m bench.profile --workers 10")
    parser.add_argument("--model", default="cnn", help="model whose round is profiled (default: cnn)")
    parser.add_argument("--workers", type=int, default=100, help="uploads per round (default: 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per step (default: 5)")
    parser.add_argument("--top", type=int, default=12, help="functions listed from the profile (default: 12)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/profile.json"),
                        help="JSON result file (default: runs/bench/profile.json)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.repeats < 1:
        parser.error("--workers and --repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    info = run_info()
    result = measure(args.model, args.workers, args.repeats, args.top)
    print(table([result]))
    write_json(args.out, {"benchmark": "profile", **info, "results": [result]})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
