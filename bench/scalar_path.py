"""What an all-scalar round costs one worker: uplink bytes and upload latency.

Bytes: the real update_parts stream of an UpdateHeader plus one packed
ScalarUpdate holding every decision unit of a model (L = its parameter
tensors), counted by the server's own accounting (read_update_header and
read_update_body: serialized size plus gRPC's 5-byte prefix per message),
against the information it carries, L x 4 bytes of float32 rho. The total
splits exactly into a fixed part (the header message, the ScalarUpdate's
framing, tags and column lengths) and the packed column values (unit index
varint, 4-byte rho, LBG version varint per unit); the issue's target is at
most 2x per unit plus a fixed part under 100 bytes.

Latency: round trips of that same upload (SubmitUpdate, header + ScalarUpdate)
to bench.servicer in another process over loopback, median and p90.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from lbgm.tasks.datasets import DATASET_SHAPES
from lbgm.common.lookback import to_float32
from lbgm.tasks.models import build_model
from lbgm.common.tls import open_channel
from lbgm.common.wire import ScalarEntry, read_update_body, read_update_header, update_parts, wire_size
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

from bench import servicer
from bench.common import (
    child_server, markdown_table, median, percentile, run_info, run_main, timed, write_json,
)

# The data set each model is trained on in configs/: it fixes the input shape the model is built for.
MODEL_DATASET = {"mlp": "mnist", "fcn": "mnist", "cnn": "mnist", "resnet18": "cifar10", "vgg19_bn": "cifar10"}
RHO_BYTES = 4  # the information of one scalar unit: one float32
TARGET_PER_UNIT_RATIO = 2.0
TARGET_FIXED_BYTES = 100
TOKEN_BYTES = 16  # what server.registry issues
MAX_TENSOR_BYTES = 1 << 20  # the bench server's limit; a scalar upload carries no tensor
CALL_TIMEOUT_SECONDS = 30.0


def varint_bytes(value: int) -> int:
    """Length of `value` as a protobuf varint: packed unit and version columns hold these."""
    return max(1, (value.bit_length() + 6) // 7)


def decision_unit_count(model: str) -> int:
    """L for layer granularity: one LBGM decision per parameter tensor of the model."""
    shape = DATASET_SHAPES[MODEL_DATASET[model]]
    return len(list(build_model(model, seed=0, shape=shape).parameters()))


def scalar_round(units: int, round_number: int, worker_id: int, seed: int) -> tuple[pb.UpdateHeader, list[ScalarEntry]]:
    """A realistic all-scalar upload: a registry-sized token, and every LBG from the previous round
    (the newest version, so its varint is as long as any a run of this length sends)."""
    rng = random.Random(seed)
    header = pb.UpdateHeader(worker_id=worker_id, token=rng.randbytes(TOKEN_BYTES), round=round_number,
                             num_samples=1200, train_loss=to_float32(rng.uniform(0.05, 2.5)))
    entries = [ScalarEntry(unit=unit, rho=to_float32(rng.uniform(-2.0, 2.0)), lbg_version=round_number - 1)
               for unit in range(units)]
    return header, entries


def account(header: pb.UpdateHeader, entries: list[ScalarEntry]) -> dict[str, Any]:
    """Bytes of one scalar upload as the server counts them, split into fixed and per-unit parts."""
    parts = list(update_parts(header, [], entries))
    stream = iter(parts)
    received = read_update_body(read_update_header(stream), stream, MAX_TENSOR_BYTES)
    total = received.wire_bytes
    if total != sum(wire_size(part) for part in parts):
        raise AssertionError(f"server accounting says {total} bytes, the sent messages are "
                             f"{sum(wire_size(part) for part in parts)}")
    columns = sum(varint_bytes(e.unit) + RHO_BYTES + varint_bytes(e.lbg_version) for e in entries)
    units = len(entries)
    fixed = total - columns
    per_unit = columns / units
    return {
        "units": units, "information_bytes": RHO_BYTES * units, "total_bytes": total,
        "header_message_bytes": received.bytes_by_kind["header"],
        "scalar_message_bytes": received.bytes_by_kind["scalar"],
        "fixed_bytes": fixed, "per_unit_bytes": per_unit, "column_bytes": columns,
        "total_ratio": total / (RHO_BYTES * units), "per_unit_ratio": per_unit / RHO_BYTES,
        "meets_target": per_unit / RHO_BYTES <= TARGET_PER_UNIT_RATIO and fixed < TARGET_FIXED_BYTES,
    }


def latencies(port: int, header: pb.UpdateHeader, entries: list[ScalarEntry], calls: int,
              warmup: int) -> list[float]:
    """Seconds per SubmitUpdate round trip; the first `warmup` calls (connection, caches) are dropped."""
    with open_channel(f"{servicer.HOST}:{port}", None) as channel:
        stub = pb_grpc.AggregatorStub(channel)

        def submit() -> None:
            ack = stub.SubmitUpdate(update_parts(header, [], entries), timeout=CALL_TIMEOUT_SECONDS)
            if ack.scalar_units != len(entries):
                raise RuntimeError(f"the server parsed {ack.scalar_units} scalar units, sent {len(entries)}")

        return [timed(submit) for _ in range(warmup + calls)][warmup:]


def measure(models: list[str], round_number: int, calls: int, warmup: int) -> list[dict[str, Any]]:
    results = []
    with child_server(servicer.serve, MAX_TENSOR_BYTES) as port:
        for index, model in enumerate(models):
            header, entries = scalar_round(decision_unit_count(model), round_number, worker_id=index + 1, seed=index)
            seconds = latencies(port, header, entries, calls, warmup)
            results.append({"model": model, "round": round_number, **account(header, entries), "calls": calls,
                            "latency_median_ms": median(seconds) * 1e3,
                            "latency_p90_ms": percentile(seconds, 0.9) * 1e3, "latency_seconds": seconds})
    return results


def verdict(results: list[dict[str, Any]]) -> str:
    """One line for the document's summary."""
    per_unit = max(r["per_unit_bytes"] for r in results) / RHO_BYTES
    fixed = max(r["fixed_bytes"] for r in results)
    latency = ", ".join(f"{r['model']} {r['latency_median_ms']:.2f} ms" for r in results)
    met = per_unit <= TARGET_PER_UNIT_RATIO and fixed < TARGET_FIXED_BYTES
    return (f"{per_unit:.2f}x the information per unit plus {fixed} fixed bytes "
            f"({'target met' if met else 'target missed'}); median ScalarUpdate round trip: {latency}.")


def table(results: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["model", "units L", "information (L x 4 B)", "fixed B", "per unit B", "total B", "total / information",
         "per unit / 4 B", f"target (<= {TARGET_PER_UNIT_RATIO:g}x + < {TARGET_FIXED_BYTES} B)", "latency median ms",
         "latency p90 ms"],
        [[r["model"], r["units"], r["information_bytes"], r["fixed_bytes"], f"{r['per_unit_bytes']:.2f}",
          r["total_bytes"], f"{r['total_ratio']:.2f}x", f"{r['per_unit_ratio']:.2f}x",
          "met" if r["meets_target"] else "missed", f"{r['latency_median_ms']:.2f}", f"{r['latency_p90_ms']:.2f}"]
         for r in results])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scalar_path", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.scalar_path --models mlp --calls 50")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18"], choices=sorted(MODEL_DATASET),
                        metavar="MODEL", help=f"any of {', '.join(sorted(MODEL_DATASET))}: models whose parameter "
                                              "tensors give L, one decision unit each (default: mlp cnn resnet18)")
    parser.add_argument("--round", type=int, default=200, dest="round_number", metavar="ROUND",
                        help="round number in the header; every LBG version is round - 1, so their varints are "
                             "as long as in round ROUND of a run (default: 200, the default job's last round)")
    parser.add_argument("--calls", type=int, default=200, metavar="N", help="timed uploads per model (default: 200)")
    parser.add_argument("--warmup", type=int, default=20, metavar="N",
                        help="untimed uploads per model before the timed ones (default: 20)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scalar_path.json"), metavar="PATH",
                        help="JSON result file (default: runs/bench/scalar_path.json)")
    args = parser.parse_args(argv)
    if args.round_number < 2 or args.calls < 1 or args.warmup < 0:
        parser.error(f"need --round >= 2, --calls >= 1 and --warmup >= 0, got {args.round_number}, {args.calls}, "
                     f"{args.warmup}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = run_info()
    results = measure(args.models, args.round_number, args.calls, args.warmup)
    print(table(results))
    write_json(args.out, {"benchmark": "scalar_path", "rho_bytes": RHO_BYTES,
                          "target_per_unit_ratio": TARGET_PER_UNIT_RATIO, "target_fixed_bytes": TARGET_FIXED_BYTES,
                          **info, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
