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
  round's accepted uploads are still alive then); the peak over rounds is
  reported, and that peak minus the mirrors is what the server holds besides
  them (torch, the test set, the model, gRPC, and what the allocator kept).
- round_seconds: from opening a round to its metrics; round 1 (every worker
  connects and sends everything in full) apart from the median of rounds 2..R.

How each grows with K is the least-squares slope over K per setting (bytes
per worker, seconds per worker). Two settings are compared at each K:

- wire dtype: float16 or bfloat16 send full gradients in that dtype and the
  mirrors keep them as they travelled, so they take half the memory; compared
  with float32 (same allocator) in mirror bytes and in peak server RSS.
- allocator: "adaptive" is glibc's own behaviour and lbgm server's default;
  "pinned" fixes glibc's mmap threshold where it starts
  (--malloc-mmap-threshold 131072), so freed upload buffers go back to the
  OS; compared with adaptive (same dtype) in peak server RSS and round time.

Points run K by K with the settings interleaved, so background load hits them
alike.
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

from lbgm.experiment.config import WIRE_DTYPES, ExperimentConfig
from lbgm.launch.federation import run_federation
from lbgm.tasks.datasets import DATASET_SHAPES, NUM_CLASSES
from lbgm.tasks.models import build_model
from lbgm.server.allocator import GLIBC_START_MMAP_THRESHOLD
from lbgm.server.rounds import WIRE_DTYPES as TORCH_DTYPES

from bench.common import chart, markdown_table, median, run_info, run_main, write_json

DELTA = 0.2
LOCAL_LR = 0.5
ROUND_TIMEOUT_SECONDS = 900.0  # generous: a round that closes short of K workers is no measurement
BASELINE_DTYPE = "float32"
# lbgm server flags per allocator setting; the savings of pinning are against the adaptive one.
ALLOCATORS = {"pinned": ("--malloc-mmap-threshold", str(GLIBC_START_MMAP_THRESHOLD)), "adaptive": ()}
BASELINE_ALLOCATOR = "adaptive"
MB = 1e6
# Measures whose slope against K is reported, and the name of that slope.
GROWTH_KEYS = {"mirror_bytes": "mirror_bytes_per_worker", "peak_rss_bytes": "peak_rss_bytes_per_worker",
               "rss_minus_mirrors_bytes": "rss_minus_mirrors_bytes_per_worker",
               "median_round_seconds": "median_round_seconds_per_worker"}
# Per compared setting: its baseline value and the measures compared against it.
COMPARISONS = {"wire_dtype": (BASELINE_DTYPE, ("mirror_bytes", "peak_rss_bytes")),
               "allocator": (BASELINE_ALLOCATOR, ("peak_rss_bytes", "median_round_seconds"))}


def scale_config(workers: int, wire_dtype: str, allocator: str, rounds: int) -> ExperimentConfig:
    return ExperimentConfig(name=f"scale-k{workers}-{wire_dtype}-{allocator}", workers=workers, rounds=rounds,
                            delta=DELTA, wire_dtype=wire_dtype, local_steps=1, batch_size=0, local_lr=LOCAL_LR,
                            round_timeout=ROUND_TIMEOUT_SECONDS, checkpoint_every=0)


def setting(result: dict[str, Any]) -> str:
    """A run's settings as its tables and plot name them."""
    return f"{result['wire_dtype']}, {result['allocator']}"


def model_parameters(config: ExperimentConfig) -> int:
    """Parameter count of the run's model: the mirrors hold one LBG per parameter tensor, buffers none."""
    model = build_model(config.model, config.seed, DATASET_SHAPES[config.dataset], NUM_CLASSES[config.dataset])
    return sum(parameter.numel() for parameter in model.parameters())


def run_point(config: ExperimentConfig, allocator: str, work_dir: Path, processes: int) -> list[dict[str, Any]]:
    """One federation to its end; its per-round records. lbgm run's summary goes to stderr with its
    progress bar, so stdout carries only the benchmark's tables."""
    with redirect_stdout(sys.stderr):
        status = run_federation(config, work_dir, processes, "WARNING", "text", server_args=ALLOCATORS[allocator])
    run_dir = work_dir / config.name
    if status != 0:
        raise RuntimeError(f"{config.name} failed with status {status}; logs in {run_dir / 'logs'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    short = [record["round"] for record in records if record["missing"]]
    if len(records) != config.rounds or short:
        raise RuntimeError(f"{config.name}: {len(records)} of {config.rounds} rounds, rounds {short} closed "
                           f"without every worker; logs in {run_dir / 'logs'}")
    return records


def summarize(config: ExperimentConfig, allocator: str, parameters: int, records: list[dict[str, Any]],
              wall_seconds: float) -> dict[str, Any]:
    """One run's scale figures; the per-round series stay in the JSON so a growing RSS can be seen."""
    model_bytes = parameters * TORCH_DTYPES[config.wire_dtype].itemsize
    rss = [record["server_rss_bytes"] for record in records]
    seconds = [record["round_seconds"] for record in records]
    mirror_bytes = records[-1]["mirror_bytes"]
    return {
        "workers": config.workers, "wire_dtype": config.wire_dtype, "allocator": allocator, "rounds": len(records),
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


def measure(workers: list[int], dtypes: list[str], allocators: list[str], rounds: int, processes: int,
            work_dir: Path) -> list[dict[str, Any]]:
    """Every (K, dtype, allocator) point, settings interleaved at each K so background load hits them alike."""
    results = []
    for count in workers:
        for dtype in dtypes:
            for allocator in allocators:
                config = scale_config(count, dtype, allocator, rounds)
                started = time.monotonic()
                records = run_point(config, allocator, work_dir, processes)
                results.append(summarize(config, allocator, model_parameters(config), records,
                                         time.monotonic() - started))
    return results


def slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares change per worker; None when the points do not span two values of K."""
    if len({k for k, _ in points}) < 2:
        return None
    ks, values = zip(*points)
    return statistics.linear_regression(ks, values).slope


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting: model bytes and the slope of each measure against K."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_setting.setdefault(setting(result), []).append(result)
    return {name: {"model_bytes": runs[0]["model_bytes"],
                   **{slope_name: slope([(r["workers"], r[key]) for r in runs])
                      for key, slope_name in GROWTH_KEYS.items()}}
            for name, runs in by_setting.items()}


def savings(results: list[dict[str, Any]], compared: str) -> list[dict[str, Any]]:
    """Each run against the run that differs from it only in `compared` (a COMPARISONS key), which holds
    that setting's baseline value: the amount saved and the ratio kept, per compared measure."""
    baseline_value, keys = COMPARISONS[compared]

    def others(result: dict[str, Any]) -> tuple[Any, ...]:
        return (result["workers"], *(result[name] for name in COMPARISONS if name != compared))

    baseline = {others(r): r for r in results if r[compared] == baseline_value}
    saved = []
    for r in results:
        base = baseline.get(others(r))
        if r[compared] != baseline_value and base is not None:
            saved.append({"workers": r["workers"], "wire_dtype": r["wire_dtype"], "allocator": r["allocator"],
                          "against": setting(base),
                          **{f"{key}_saved": base[key] - r[key] for key in keys},
                          **{f"{key}_ratio": r[key] / base[key] for key in keys}})
    return saved


def megabytes(count: float | None) -> str:
    """Bytes as MB for the tables; n/a for a slope that one K cannot give."""
    return "n/a" if count is None else f"{count / MB:,.2f}"


def milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:,.2f}"


def tables(results: list[dict[str, Any]], grown: dict[str, dict[str, Any]],
           saved: dict[str, list[dict[str, Any]]]) -> str:
    by_run = {compared: {(s["workers"], s["wire_dtype"], s["allocator"]): s for s in entries}
              for compared, entries in saved.items()}

    def saved_cell(result: dict[str, Any], compared: str, key: str) -> str:
        s = by_run[compared].get((result["workers"], result["wire_dtype"], result["allocator"]))
        if s is None:
            return "-"
        if key.endswith("seconds"):  # a time is longer or shorter, not saved: shown as a ratio
            return f"{s[f'{key}_ratio']:.2f}x"
        return f"{megabytes(s[f'{key}_saved'])} ({1 - s[f'{key}_ratio']:.0%})"

    runs = markdown_table(
        ["K", "wire dtype", "allocator", "model MB", "mirrors MB", "mirrors = K x model", "peak RSS MB",
         "RSS - mirrors MB", "round 1 s", "median round 2..R s", f"mirrors saved vs {BASELINE_DTYPE}",
         f"peak RSS saved vs {BASELINE_DTYPE}", f"peak RSS saved vs {BASELINE_ALLOCATOR}",
         f"round time / {BASELINE_ALLOCATOR}'s"],
        [[r["workers"], r["wire_dtype"], r["allocator"], megabytes(r["model_bytes"]), megabytes(r["mirror_bytes"]),
          "yes" if r["mirrors_match"] else "NO", megabytes(r["peak_rss_bytes"]),
          megabytes(r["rss_minus_mirrors_bytes"]), f"{r['first_round_seconds']:.2f}",
          f"{r['median_round_seconds']:.3f}", saved_cell(r, "wire_dtype", "mirror_bytes"),
          saved_cell(r, "wire_dtype", "peak_rss_bytes"), saved_cell(r, "allocator", "peak_rss_bytes"),
          saved_cell(r, "allocator", "median_round_seconds")]
         for r in results])
    per_worker = markdown_table(
        ["wire dtype, allocator", "model MB", "mirrors MB / worker", "peak RSS MB / worker",
         "RSS - mirrors MB / worker", "median round ms / worker"],
        [[name, megabytes(g["model_bytes"]), megabytes(g["mirror_bytes_per_worker"]),
          megabytes(g["peak_rss_bytes_per_worker"]), megabytes(g["rss_minus_mirrors_bytes_per_worker"]),
          milliseconds(g["median_round_seconds_per_worker"])]
         for name, g in grown.items()])
    return f"{runs}\n\nGrowth with K (least-squares slope over K):\n\n{per_worker}"


def all_savings(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {compared: savings(results, compared) for compared in COMPARISONS}


def verdict(results: list[dict[str, Any]]) -> str:
    """One line for the document's summary."""
    exact = all(r["mirrors_match"] for r in results)
    slopes = "; ".join(f"{name}: {megabytes(g['peak_rss_bytes_per_worker'])} MB RSS and "
                       f"{milliseconds(g['median_round_seconds_per_worker'])} ms per round per added worker"
                       for name, g in growth(results).items())
    saved = all_savings(results)
    # The largest K, and there lbgm server's default allocator when it was measured.
    largest = {compared: max(entries, key=lambda s: (s["workers"], s["allocator"] == BASELINE_ALLOCATOR), default=None)
               for compared, entries in saved.items()}
    sentences = []
    if (dtype := largest["wire_dtype"]) is not None:
        sentences.append(f"At K = {dtype['workers']}, {dtype['wire_dtype']} mirrors save "
                         f"{1 - dtype['mirror_bytes_ratio']:.0%} of the mirrors and "
                         f"{1 - dtype['peak_rss_bytes_ratio']:.0%} of peak server RSS ({dtype['allocator']}).")
    if (pinned := largest["allocator"]) is not None:
        sentences.append(f"The pinned allocator saves {1 - pinned['peak_rss_bytes_ratio']:.0%} of peak server RSS "
                         f"against glibc's adaptive one at K = {pinned['workers']} ({pinned['wire_dtype']}), with "
                         f"rounds {pinned['median_round_seconds_ratio']:.2f}x as long.")
    return " ".join([f"Mirrors {'equal' if exact else 'DO NOT equal'} K x model bytes in every run; growth: {slopes}.",
                     *sentences])


def table(results: list[dict[str, Any]]) -> str:
    """Both tables from the per-run results alone (what bench.performance renders)."""
    return tables(results, growth(results), all_savings(results))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Peak server RSS against K per setting, and the mirrors per wire dtype."""
    with chart(path, "Server memory against the number of workers", "virtual workers K", "MB") as axes:
        for name in dict.fromkeys(setting(r) for r in results):
            runs = sorted((r for r in results if setting(r) == name), key=lambda r: r["workers"])
            axes.plot([r["workers"] for r in runs], [r["peak_rss_bytes"] / MB for r in runs], marker="o",
                      label=f"peak server RSS, {name}")
        for dtype in dict.fromkeys(r["wire_dtype"] for r in results):
            runs = sorted({r["workers"]: r for r in results if r["wire_dtype"] == dtype}.values(),
                          key=lambda r: r["workers"])
            axes.plot([r["workers"] for r in runs], [r["mirror_bytes"] / MB for r in runs], marker="s",
                      linestyle="--", label=f"mirrors, {dtype}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.scale --workers 10 50 --rounds 3")
    parser.add_argument("--workers", nargs="+", type=int, default=[10, 50, 100, 200], metavar="K",
                        help="numbers of virtual workers, one federation each per dtype (default: 10 50 100 200)")
    parser.add_argument("--wire-dtypes", nargs="+", default=[BASELINE_DTYPE, "float16"], choices=WIRE_DTYPES,
                        metavar="DTYPE", help=f"any of {', '.join(WIRE_DTYPES)}: dtype of dense full gradients on the wire "
                                              "and in the mirrors; savings are against float32 when it is listed "
                                              "(default: float32 float16)")
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS,
                        metavar="SETTING", help="any of pinned (glibc's mmap threshold fixed at 128 KiB) and "
                                                "adaptive (glibc's own, lbgm server's default); pinning is compared "
                                                "with adaptive when both are listed (default: pinned adaptive)")
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
    results = measure(args.workers, args.wire_dtypes, args.allocators, args.rounds, args.processes, args.work_dir)
    grown, saved = growth(results), all_savings(results)
    print(tables(results, grown, saved))
    write_json(args.out, {"benchmark": "scale", "delta": DELTA, "local_lr": LOCAL_LR, "processes": args.processes,
                          **info, "wall_seconds": time.monotonic() - started, "results": results,
                          "growth": grown, "savings": saved})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
