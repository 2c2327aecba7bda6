"""Scale: server memory and round time for K virtual workers, with full-size and compact mirrors.

Each (K, wire dtype) point is a real federation (`lbgm run`: one server
process and P worker processes hosting the K virtual workers, gRPC over
127.0.0.1) of the default job (MLP on mnist-embedded, iid, tau = 1 full-shard
step, delta = 0.2), with checkpoints off so disk writes stay out of the round
times. Everything is read from the server's own metrics.jsonl:

- mirror_bytes: the server's LBG mirrors after the last round. Round 1 sends
  every layer in full, so from then on the mirrors hold one model copy per
  worker in the wire dtype: exactly K x model bytes (parameters x 4 B for
  float32, x 2 B for float16/bfloat16), which each run checks.
- server_rss_bytes: the server's resident memory when each round closes (the
  round's accepted gradients are still alive then); the peak over rounds is
  reported, and that peak minus the mirrors is what the server holds besides
  them (torch, the test set, the model, and the K float32 gradients of a round).
- round_seconds: from opening a round to its metrics; round 1 (every worker
  connects and sends everything in full) apart from the median of rounds 2..R.

How each grows with K is the least-squares slope over K per dtype (bytes per
worker, seconds per worker). The compact option is wire_dtype = float16 or
bfloat16: workers send full gradients in that dtype and the mirrors keep them
as they travelled, so they take half the memory; each K reports what that
saves against float32 in mirror bytes and in peak server RSS. Points run K by
K with the dtypes interleaved, so background load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from lbgm.cli.launcher import run_federation
from lbgm.common.config import WIRE_DTYPES, ExperimentConfig
from lbgm.common.datasets import DATASET_SHAPES, NUM_CLASSES
from lbgm.common.models import build_model
from lbgm.server.rounds import WIRE_DTYPES as TORCH_DTYPES

from bench.common import chart, markdown_table, median, run_info, run_main, write_json

DELTA = 0.2
LOCAL_LR = 0.5
ROUND_TIMEOUT_SECONDS = 900.0  # generous: a round that closes short of K workers is no measurement
BASELINE_DTYPE = "float32"
MB = 1e6
# Measures whose slope against K is reported, and the name of that slope.
GROWTH_KEYS = {"mirror_bytes": "mirror_bytes_per_worker", "peak_rss_bytes": "peak_rss_bytes_per_worker",
               "rss_minus_mirrors_bytes": "rss_minus_mirrors_bytes_per_worker",
               "median_round_seconds": "median_round_seconds_per_worker"}
SAVING_KEYS = ("mirror_bytes", "peak_rss_bytes")  # what the compact mirrors are compared on


def scale_config(workers: int, wire_dtype: str, rounds: int) -> ExperimentConfig:
    return ExperimentConfig(name=f"scale-k{workers}-{wire_dtype}", workers=workers, rounds=rounds, delta=DELTA,
                            wire_dtype=wire_dtype, local_steps=1, batch_size=0, local_lr=LOCAL_LR,
                            round_timeout=ROUND_TIMEOUT_SECONDS, checkpoint_every=0)


def model_parameters(config: ExperimentConfig) -> int:
    """Parameter count of the run's model: the mirrors hold one LBG per parameter tensor, buffers none."""
    model = build_model(config.model, config.seed, DATASET_SHAPES[config.dataset], NUM_CLASSES[config.dataset])
    return sum(parameter.numel() for parameter in model.parameters())


def run_point(config: ExperimentConfig, work_dir: Path, processes: int) -> list[dict[str, Any]]:
    """One federation to its end; its per-round records. lbgm run's summary goes to stderr with its
    progress bar, so stdout carries only the benchmark's tables."""
    with redirect_stdout(sys.stderr):
        status = run_federation(config, work_dir, processes, "WARNING", "text")
    run_dir = work_dir / config.name
    if status != 0:
        raise RuntimeError(f"{config.name} failed with status {status}; logs in {run_dir / 'logs'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    short = [record["round"] for record in records if record["missing"]]
    if len(records) != config.rounds or short:
        raise RuntimeError(f"{config.name}: {len(records)} of {config.rounds} rounds, rounds {short} closed "
                           f"without every worker; logs in {run_dir / 'logs'}")
    return records


def summarize(config: ExperimentConfig, parameters: int, records: list[dict[str, Any]],
              wall_seconds: float) -> dict[str, Any]:
    """One run's scale figures; the per-round series stay in the JSON so a growing RSS can be seen."""
    model_bytes = parameters * TORCH_DTYPES[config.wire_dtype].itemsize
    rss = [record["server_rss_bytes"] for record in records]
    seconds = [record["round_seconds"] for record in records]
    mirror_bytes = records[-1]["mirror_bytes"]
    return {
        "workers": config.workers, "wire_dtype": config.wire_dtype, "rounds": len(records),
        "model_parameters": parameters, "model_bytes": model_bytes, "k_model_bytes": config.workers * model_bytes,
        "mirror_bytes": mirror_bytes, "mirrors_match": mirror_bytes == config.workers * model_bytes,
        "peak_rss_bytes": max(rss), "rss_minus_mirrors_bytes": max(rss) - mirror_bytes,
        "first_round_seconds": seconds[0], "median_round_seconds": median(seconds[1:]),
        "wall_seconds": wall_seconds, "rss_bytes": rss, "round_seconds": seconds,
        "mirror_bytes_by_round": [record["mirror_bytes"] for record in records],
        "full_units": [record["full_units"] for record in records],
        "scalar_units": [record["scalar_units"] for record in records],
        "uplink_bytes": [record["uplink_bytes"] for record in records],
    }


def measure(workers: list[int], dtypes: list[str], rounds: int, processes: int,
            work_dir: Path) -> list[dict[str, Any]]:
    """Every (K, dtype) point, dtypes interleaved at each K so background load hits them alike."""
    results = []
    for count in workers:
        for dtype in dtypes:
            config = scale_config(count, dtype, rounds)
            started = time.monotonic()
            records = run_point(config, work_dir, processes)
            results.append(summarize(config, model_parameters(config), records, time.monotonic() - started))
    return results


def slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares change per worker; None when the points do not span two values of K."""
    if len({k for k, _ in points}) < 2:
        return None
    ks, values = zip(*points)
    return statistics.linear_regression(ks, values).slope


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dtype: model bytes and the slope of each measure against K."""
    by_dtype: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_dtype.setdefault(result["wire_dtype"], []).append(result)
    return {dtype: {"model_bytes": runs[0]["model_bytes"],
                    **{name: slope([(r["workers"], r[key]) for r in runs]) for key, name in GROWTH_KEYS.items()}}
            for dtype, runs in by_dtype.items()}


def savings(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each compact run against the float32 run of the same K: bytes saved and the ratio kept."""
    baseline = {r["workers"]: r for r in results if r["wire_dtype"] == BASELINE_DTYPE}
    saved = []
    for r in results:
        base = baseline.get(r["workers"])
        if r["wire_dtype"] != BASELINE_DTYPE and base is not None:
            saved.append({"workers": r["workers"], "wire_dtype": r["wire_dtype"],
                          **{f"{key}_saved": base[key] - r[key] for key in SAVING_KEYS},
                          **{f"{key}_ratio": r[key] / base[key] for key in SAVING_KEYS}})
    return saved


def megabytes(count: float | None) -> str:
    """Bytes as MB for the tables; n/a for a slope that one K cannot give."""
    return "n/a" if count is None else f"{count / MB:,.2f}"


def milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:,.2f}"


def tables(results: list[dict[str, Any]], grown: dict[str, dict[str, Any]], saved: list[dict[str, Any]]) -> str:
    saving = {(s["workers"], s["wire_dtype"]): s for s in saved}

    def saved_cell(result: dict[str, Any], key: str) -> str:
        s = saving.get((result["workers"], result["wire_dtype"]))
        return "-" if s is None else f"{megabytes(s[f'{key}_saved'])} ({1 - s[f'{key}_ratio']:.0%})"

    runs = markdown_table(
        ["K", "wire dtype", "model MB", "K x model MB", "mirrors MB", "mirrors = K x model", "peak RSS MB",
         "RSS - mirrors MB", "round 1 s", "median round 2..R s", f"mirrors saved vs {BASELINE_DTYPE}",
         f"peak RSS saved vs {BASELINE_DTYPE}"],
        [[r["workers"], r["wire_dtype"], megabytes(r["model_bytes"]), megabytes(r["k_model_bytes"]),
          megabytes(r["mirror_bytes"]), "yes" if r["mirrors_match"] else "NO", megabytes(r["peak_rss_bytes"]),
          megabytes(r["rss_minus_mirrors_bytes"]), f"{r['first_round_seconds']:.2f}",
          f"{r['median_round_seconds']:.3f}", saved_cell(r, "mirror_bytes"), saved_cell(r, "peak_rss_bytes")]
         for r in results])
    per_worker = markdown_table(
        ["wire dtype", "model MB", "mirrors MB / worker", "peak RSS MB / worker", "RSS - mirrors MB / worker",
         "median round ms / worker"],
        [[dtype, megabytes(g["model_bytes"]), megabytes(g["mirror_bytes_per_worker"]),
          megabytes(g["peak_rss_bytes_per_worker"]), megabytes(g["rss_minus_mirrors_bytes_per_worker"]),
          milliseconds(g["median_round_seconds_per_worker"])]
         for dtype, g in grown.items()])
    return f"{runs}\n\nGrowth with K (least-squares slope over K):\n\n{per_worker}"


def verdict(results: list[dict[str, Any]]) -> str:
    """One line for the document's summary."""
    exact = all(r["mirrors_match"] for r in results)
    grown = growth(results)
    slopes = "; ".join(f"{dtype}: {megabytes(g['peak_rss_bytes_per_worker'])} MB RSS and "
                       f"{milliseconds(g['median_round_seconds_per_worker'])} ms per round per added worker"
                       for dtype, g in grown.items())
    saved = max(savings(results), key=lambda s: s["workers"], default=None)
    compact = ("" if saved is None else f" At K = {saved['workers']}, {saved['wire_dtype']} saves "
               f"{1 - saved['mirror_bytes_ratio']:.0%} of the mirrors and {1 - saved['peak_rss_bytes_ratio']:.0%} "
               "of peak server RSS.")
    return (f"Mirrors {'equal' if exact else 'DO NOT equal'} K x model bytes in every run; growth: {slopes}."
            + compact)


def table(results: list[dict[str, Any]]) -> str:
    """Both tables from the per-run results alone (what bench.performance renders)."""
    return tables(results, growth(results), savings(results))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Peak server RSS and mirror bytes against K, one line per wire dtype."""
    with chart(path, "Server memory against the number of workers", "virtual workers K", "MB") as axes:
        for dtype in dict.fromkeys(r["wire_dtype"] for r in results):
            runs = sorted((r for r in results if r["wire_dtype"] == dtype), key=lambda r: r["workers"])
            ks = [r["workers"] for r in runs]
            axes.plot(ks, [r["peak_rss_bytes"] / MB for r in runs], marker="o", label=f"peak server RSS, {dtype}")
            axes.plot(ks, [r["mirror_bytes"] / MB for r in runs], marker="s", linestyle="--",
                      label=f"mirrors, {dtype}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.scale --workers 10 50 --rounds 3")
    parser.add_argument("--workers", nargs="+", type=int, default=[10, 50, 100, 200], metavar="K",
                        help="numbers of virtual workers, one federation each per dtype (default: 10 50 100 200)")
    parser.add_argument("--wire-dtypes", nargs="+", default=[BASELINE_DTYPE, "float16"], choices=WIRE_DTYPES,
                        metavar="DTYPE", help=f"any of {', '.join(WIRE_DTYPES)}: dtype of full gradients on the wire "
                                              "and in the mirrors; savings are against float32 when it is listed "
                                              "(default: float32 float16)")
    parser.add_argument("--rounds", type=int, default=5, metavar="R",
                        help="rounds per federation, at least 2: round 1 is reported apart (default: 5)")
    parser.add_argument("--processes", type=int, default=2, metavar="P",
                        help="worker OS processes the K virtual workers are spread over, at most the smallest K "
                             "(default: 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench/scale-runs"), metavar="DIR",
                        help="where each federation's run folder (metrics.jsonl, logs) goes; runs of the same K "
                             "and dtype are overwritten (default: runs/bench/scale-runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale.json"), metavar="PATH",
                        help="JSON result file (default: runs/bench/scale.json)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or not 1 <= args.processes <= min(args.workers):
        parser.error(f"need --rounds >= 2 and 1 <= --processes <= the smallest K, got {args.rounds} and "
                     f"{args.processes}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = run_info()
    started = time.monotonic()
    results = measure(args.workers, args.wire_dtypes, args.rounds, args.processes, args.work_dir)
    grown, saved = growth(results), savings(results)
    print(tables(results, grown, saved))
    write_json(args.out, {"benchmark": "scale", "delta": DELTA, "local_lr": LOCAL_LR, "processes": args.processes,
                          **info, "wall_seconds": time.monotonic() - started, "results": results,
                          "growth": grown, "savings": saved})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
