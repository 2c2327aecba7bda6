"""Thousands of workers: one server with K = 1,000 and 5,000 virtual workers, 10% sampled per round,
mirrors in RAM and on disk (issue 18, items 3 and 4).

Each point (K, worker models, mirror store) is a real federation, `lbgm run --mirrors memory|disk`:
one server and --processes worker processes hosting the K virtual workers, gRPC over 127.0.0.1, the
MNIST CNN
(431,080 parameters: 1.72 MB per mirror in float32, so 5,000 workers' mirrors are 8.6 GB) on
mnist-embedded (12,000 training images: 2 or 3 per worker at K = 5,000), iid, tau = 1 full-shard
step, delta 0.2, checkpoints off. Worker models: *own* is the built-in task, where every virtual
worker builds its own model (1.72 MB each, so 5,000 of them need 8.6 GB in the worker processes
besides their LBGs); *shared* is the same task with one model per worker process
(bench/shared_model_task.py: virtual workers train one at a time and load the global model first,
so they can share it; the final model is checked equal to *own*'s at the same K). While it runs, the
proportional set size (PSS, /proc/<pid>/smaps_rollup) of the server and of each worker process is
read every half second; the server's own metrics.jsonl gives its resident memory (RSS) when each
round closes, its mirror bytes and the round times.

- mirrors held: a worker's mirror exists once it was sampled (its first upload sends every layer in
  full), so after R rounds about K x (1 - 0.9^R) workers hold one; the run's last mirror_bytes says
  how many exactly (mirror bytes / model bytes).
- server memory per mirror: the least-squares slope of the server's RSS against its mirror bytes over
  the rounds of one run (1.0 = each mirror byte costs one byte of RAM).
- memory per worker: the slope of a peak over K (two values of K), per mirror store, for the server
  and for the worker processes.
- round time: median of rounds 2..R (round 1 is every sampled worker's first upload and the joins).
- CPU: the server's and the worker processes' CPU-seconds (/proc/<pid>/stat) from round 1's close to
  round R's, per round, and the server's share of one core meanwhile (its Python threads share one GIL,
  so a share near 1.0 means the server is the limit).

Points run in the order given (by default K by K, the two stores back to back), so background load
hits the compared points alike.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from dataclasses import dataclass, field

from lbgm.common.state_files import content_digest, load
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.mirrors import MIRROR_STORES
from lbgm.task.loader import BUILTIN_TASK

from bench.ingest import cpu_seconds
from bench.common import chart, markdown_table, median, run_info, run_main, write_json
from lbgm.launch.federation import federation_processes, local_placement
from bench.scale import model_parameters, slope

MB = 1e6
ROUND_TIMEOUT_SECONDS = 900.0  # generous: a round that closes short of its sampled workers is no measurement
DELTA = 0.2
LOCAL_LR = 0.01
WORKER_MODELS = {"own": BUILTIN_TASK, "shared": "bench/shared_model_task.py:classification"}
DEFAULT_POINTS = ("1000:own:memory", "1000:shared:memory", "1000:shared:disk", "5000:shared:memory",
                  "5000:shared:disk")
# Thousands of virtual workers join through the server's few control-call slots (refused beyond, retried with
# backoff), which takes minutes: they must not give up after lbgm worker's default 300 s. An idle virtual
# worker long-polls for 60 s instead of 20, so the K - sampled idle ones re-poll a third as often.
WORKER_ARGS = ("--give-up-after", "3600", "--poll-seconds", "60")


@dataclass(frozen=True)
class Point:
    workers: int
    models: str  # a WORKER_MODELS key
    mirrors: str  # an lbgm server --mirrors value

    @classmethod
    def parse(cls, text: str) -> Point:
        """K:MODELS:MIRRORS, e.g. 5000:shared:disk."""
        workers, models, mirrors = text.split(":")
        if int(workers) < 1 or models not in WORKER_MODELS or mirrors not in MIRROR_STORES:
            raise ValueError(text)
        return cls(int(workers), models, mirrors)


def thousands_config(point: Point, rounds: int, fraction: float, model: str) -> ExperimentConfig:
    return ExperimentConfig(name=f"thousands-k{point.workers}-{point.models}-{point.mirrors}", workers=point.workers,
                            fraction=fraction, model=model, task=WORKER_MODELS[point.models], rounds=rounds,
                            delta=DELTA, local_steps=1, batch_size=0, local_lr=LOCAL_LR,
                            round_timeout=ROUND_TIMEOUT_SECONDS, checkpoint_every=0)


def setting(result: dict[str, Any]) -> str:
    return f"{result['models']} models, {result['mirrors']} mirrors"


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages such as libtorch's count once over all the
    processes sharing them); 0 once it exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far; 0 once it exited."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every live thread of a process (a process's own
    /proc/<pid>/status counts only its main thread); 0 once it exited."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            continue
    return total


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


@dataclass
class Peaks:
    """The largest PSS seen, per role and of the largest worker process; and when each round was first seen
    closed, the CPU time the server and the worker processes had used by then."""

    server: int = 0
    workers: int = 0
    largest_worker: int = 0
    total: int = 0
    samples: int = 0
    # rounds closed: (t, server CPU-s, worker processes' CPU-s, worker processes' context switches)
    cpu_when_closed: dict[int, tuple[float, float, float, int]] = field(default_factory=dict)

    def add(self, server: int, workers: Sequence[int]) -> None:
        self.server, self.workers = max(self.server, server), max(self.workers, sum(workers))
        self.largest_worker = max(self.largest_worker, *workers)
        self.total = max(self.total, server + sum(workers))
        self.samples += 1

    def cpu_per_round(self, rounds: int) -> dict[str, float | None]:
        """CPU-seconds per round of the server and of the worker processes over rounds 2..R, the server's
        share of one core meanwhile (near 1.0: its Python threads, which share one GIL, are the limit) and
        the worker processes' context switches per second (threads woken to find nothing to do)."""
        first, last = self.cpu_when_closed.get(1), self.cpu_when_closed.get(rounds)
        if first is None or last is None or last[0] <= first[0]:
            return {"server_cpu_seconds_per_round": None, "workers_cpu_seconds_per_round": None,
                    "server_core_share": None, "workers_context_switches_per_second": None}
        return {"server_cpu_seconds_per_round": (last[1] - first[1]) / (rounds - 1),
                "workers_cpu_seconds_per_round": (last[2] - first[2]) / (rounds - 1),
                "server_core_share": (last[1] - first[1]) / (last[0] - first[0]),
                "workers_context_switches_per_second": (last[3] - first[3]) / (last[0] - first[0])}


def run_federation_sampled(config: ExperimentConfig, mirrors: str, processes: int, work_dir: Path,
                           log_level: str) -> Peaks:
    """The federation to its end (`lbgm run --mirrors MIRRORS --processes P` without its progress bar),
    its processes' memory sampled every half second."""
    peaks = Peaks()
    placement = local_placement(config.workers, processes, ("--mirrors", mirrors), WORKER_ARGS)
    with federation_processes(config, work_dir, placement, log_level) as federation:
        def sample() -> None:
            peaks.add(pss_bytes(federation.server.pid), [pss_bytes(worker.pid) for worker in federation.workers])
            closed = lines_in(federation.run_dir / "metrics.jsonl")
            if closed not in peaks.cpu_when_closed:
                peaks.cpu_when_closed[closed] = (
                    time.monotonic(), process_cpu_seconds(federation.server.pid),
                    sum(process_cpu_seconds(worker.pid) for worker in federation.workers),
                    sum(context_switches(worker.pid) for worker in federation.workers))

        federation.wait(sample)
    if federation.server.returncode != 0:
        raise RuntimeError(f"{config.name}: the server exited with status {federation.server.returncode}; logs in "
                           f"{federation.logs}")
    return peaks


def join_seconds(records: list[dict[str, Any]]) -> float:
    """From the server's start to round 1's opening: every worker joining (round 1 waits for all K)."""
    return records[0]["elapsed_seconds"] - records[0]["round_seconds"]


def run_point(config: ExperimentConfig, mirrors: str, processes: int, work_dir: Path,
              log_level: str = "WARNING") -> dict[str, Any]:
    """One federation to its end, sampled; its figures."""
    run_dir = work_dir / config.name
    started = time.monotonic()
    when = {"started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_1m": os.getloadavg()[0]}  # what else ran: a loaded 2-core box slows every round
    peaks = run_federation_sampled(config, mirrors, processes, work_dir, log_level)
    wall = time.monotonic() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    short = [record["round"] for record in records if record["missing"]]
    if len(records) != config.rounds or short:
        raise RuntimeError(f"{config.name}: {len(records)} of {config.rounds} rounds, rounds {short} closed "
                           f"without every sampled worker; logs in {run_dir / 'logs'}")
    model_bytes = 4 * model_parameters(config)
    rss = [record["server_rss_bytes"] for record in records]
    mirror_bytes = [record["mirror_bytes"] for record in records]
    seconds = [record["round_seconds"] for record in records]
    final = load(run_dir / "final_model.pt")
    return {
        **when, "workers": config.workers, "mirrors": mirrors, "fraction": config.fraction, "rounds": len(records),
        "sampled_per_round": len(records[-1]["sampled"]), "processes": processes, "model": config.model,
        "model_bytes": model_bytes, "mirror_bytes": mirror_bytes[-1],
        "workers_with_mirrors": mirror_bytes[-1] / model_bytes,
        "server_peak_rss_bytes": max(rss), "server_peak_pss_bytes": peaks.server,
        "workers_peak_pss_bytes": peaks.workers, "largest_worker_process_pss_bytes": peaks.largest_worker,
        "total_peak_pss_bytes": peaks.total,
        "server_rss_per_mirror_byte": slope(list(zip(mirror_bytes, rss))) if len(set(mirror_bytes)) > 1 else None,
        "join_seconds": join_seconds(records), **peaks.cpu_per_round(config.rounds), "first_round_seconds": seconds[0],
        "median_round_seconds": median(seconds[1:]),
        "wall_seconds": wall, "pss_samples": peaks.samples,
        "rss_bytes": rss, "mirror_bytes_by_round": mirror_bytes, "round_seconds": seconds,
        "full_units": [record["full_units"] for record in records],
        "scalar_units": [record["scalar_units"] for record in records],
        "final_accuracy": records[-1]["test_accuracy"],
        "final_model_digest": content_digest([*final["params"], *final["buffers"]]),
    }


def measure(points: Sequence[Point], rounds: int, fraction: float, model: str, processes: int,
            work_dir: Path, done: Callable[[list[dict[str, Any]]], None] = lambda _: None,
            log_level: str = "WARNING") -> list[dict[str, Any]]:
    """Every point in order; `done(results so far)` after each, so a long run keeps what it measured."""
    results = []
    for point in points:
        result = {"models": point.models, **run_point(thousands_config(point, rounds, fraction, model), point.mirrors,
                                                      processes, work_dir, log_level)}
        print(f"K = {point.workers}, {setting(result)}: server peak RSS {result['server_peak_rss_bytes'] / MB:,.0f} "
              f"MB, workers peak PSS {result['workers_peak_pss_bytes'] / MB:,.0f} MB, median round "
              f"{result['median_round_seconds']:.2f} s", flush=True)
        results.append(result)
        mark_same_final_models(results)
        done(results)
    return results


def mark_same_final_models(results: list[dict[str, Any]]) -> None:
    """Whatever the worker models and the mirror store, the training is the same: one final model per K."""
    by_k: dict[int, set[str]] = {}
    for result in results:
        by_k.setdefault(result["workers"], set()).add(result["final_model_digest"])
    for result in results:
        result["same_final_model_at_k"] = len(by_k[result["workers"]]) == 1


PER_WORKER_KEYS = {"server_peak_rss_bytes": "server_rss_bytes_per_worker",
                   "workers_peak_pss_bytes": "workers_pss_bytes_per_worker",
                   "median_round_seconds": "round_seconds_per_worker"}


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per setting (worker models, mirror store): the slope over K of each peak (None with a single K)."""
    return {name: {slope_name: slope([(r["workers"], r[key]) for r in results if setting(r) == name])
                   for key, slope_name in PER_WORKER_KEYS.items()}
            for name in dict.fromkeys(setting(r) for r in results)}


def megabytes(count: float | None) -> str:
    return "n/a" if count is None else f"{count / MB:,.1f}"


def optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    runs = markdown_table(
        ["K", "worker models", "mirrors", "sampled / round", "rounds", "workers holding a mirror", "mirrors MB",
         "server peak RSS MB", "server peak PSS MB", "server RSS per mirror byte", "worker processes peak PSS MB",
         "largest worker process MB", "all joined after s", "round 1 s", "median round 2..R s",
         "server CPU-s / round", "worker processes CPU-s / round", "server's share of a core",
         "worker processes' context switches / s", "same final model at K"],
        [[r["workers"], r["models"], r["mirrors"], r["sampled_per_round"], r["rounds"], f"{r['workers_with_mirrors']:,.0f}",
          megabytes(r["mirror_bytes"]), megabytes(r["server_peak_rss_bytes"]), megabytes(r["server_peak_pss_bytes"]),
          "n/a" if r["server_rss_per_mirror_byte"] is None else f"{r['server_rss_per_mirror_byte']:.2f}",
          megabytes(r["workers_peak_pss_bytes"]), megabytes(r["largest_worker_process_pss_bytes"]),
          f"{r['join_seconds']:.0f}", f"{r['first_round_seconds']:.1f}", f"{r['median_round_seconds']:.2f}",
          *[optional(r.get(key)) for key in ("server_cpu_seconds_per_round", "workers_cpu_seconds_per_round",
                                             "server_core_share")],
          "n/a" if r.get("workers_context_switches_per_second") is None
          else f"{r['workers_context_switches_per_second']:,.0f}",
          "yes" if r["same_final_model_at_k"] else "NO"]
         for r in results])
    per_worker = markdown_table(
        ["worker models, mirrors", "server peak RSS MB / worker", "worker processes peak PSS MB / worker", "round ms / worker"],
        [[store, megabytes(g["server_rss_bytes_per_worker"]), megabytes(g["workers_pss_bytes_per_worker"]),
          "n/a" if g["round_seconds_per_worker"] is None else f"{g['round_seconds_per_worker'] * 1e3:.2f}"]
         for store, g in growth(results).items()])
    return f"{runs}\n\nGrowth with K (least-squares slope over K):\n\n{per_worker}"


def per_sampled_cpu(result: dict[str, Any]) -> str:
    """The CPU a round cost per sampled worker, on the server and in the worker processes."""
    server, workers = result.get("server_cpu_seconds_per_round"), result.get("workers_cpu_seconds_per_round")
    if server is None or workers is None:
        return ""
    sampled = result["sampled_per_round"]
    return f" ({server / sampled * 1e3:.0f} ms of server CPU and {workers / sampled * 1e3:.0f} ms in the worker " \
           f"processes per sampled worker)"


def verdict(results: list[dict[str, Any]]) -> str:
    largest = max(r["workers"] for r in results)
    at_largest = {setting(r): r for r in results if r["workers"] == largest}
    parts = [f"{name}: all joined after {r['join_seconds']:.0f} s, server peak RSS "
             f"{megabytes(r['server_peak_rss_bytes'])} MB holding {r['workers_with_mirrors']:,.0f} mirrors "
             f"({megabytes(r['mirror_bytes'])} MB), median round {r['median_round_seconds']:.1f} s"
             + per_sampled_cpu(r) for name, r in at_largest.items()]
    return f"At K = {largest} ({at_largest[next(iter(at_largest))]['sampled_per_round']} sampled per round): " + \
        "; ".join(parts) + "."


def plot(results: list[dict[str, Any]], path: Path) -> None:
    with chart(path, "One server, thousands of workers (10% sampled per round)", "virtual workers K", "MB") as axes:
        for name in dict.fromkeys(setting(r) for r in results):
            runs = sorted((r for r in results if setting(r) == name), key=lambda r: r["workers"])
            ks = [r["workers"] for r in runs]
            axes.plot(ks, [r["server_peak_rss_bytes"] / MB for r in runs], marker="o", label=f"server peak RSS, {name}")
            axes.plot(ks, [r["workers_peak_pss_bytes"] / MB for r in runs], marker="s", linestyle="--",
                      label=f"worker processes peak PSS, {name}")
        runs = sorted({r["workers"]: r for r in results}.values(), key=lambda r: r["workers"])
        axes.plot([r["workers"] for r in runs], [r["mirror_bytes"] / MB for r in runs], marker="^", linestyle=":",
                  label="mirror bytes held at the end")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.thousands", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.thousands --points 100:own:memory "
               "100:own:disk --rounds 3")
    parser.add_argument("--points", nargs="+", type=Point.parse, default=[Point.parse(p) for p in DEFAULT_POINTS],
                        metavar="K:MODELS:MIRRORS",
                        help="federations to run, in this order: K virtual workers, worker models own or shared, "
                             f"lbgm server --mirrors memory or disk (default: {' '.join(DEFAULT_POINTS)})")
    parser.add_argument("--rounds", type=int, default=5, metavar="R", help="rounds per federation, at least 2 "
                                                                            "(default: 5)")
    parser.add_argument("--fraction", type=float, default=0.1, help="workers sampled per round (default: 0.1)")
    parser.add_argument("--model", default="cnn", help="model of the built-in task (default: cnn)")
    parser.add_argument("--processes", type=int, default=2, metavar="P",
                        help="worker processes the K virtual workers are spread over (default: 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench/thousands-runs"), metavar="DIR",
                        help="where each federation's run folder goes (default: runs/bench/thousands-runs)")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the server's and workers' log level, logs in each run folder's logs/ (default: WARNING)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/thousands.json"), metavar="PATH",
                        help="JSON result file (default: runs/bench/thousands.json)")
    parser.add_argument("--append", action="store_true",
                        help="keep the results already in --out (same --rounds, --fraction, --model and --processes) "
                             "and add these points' after them, e.g. to measure the largest K later, on a quieter "
                             "machine")
    args = parser.parse_args(argv)
    if args.rounds < 2 or not 1 <= args.processes <= min(p.workers for p in args.points) or not 0 < args.fraction <= 1:
        parser.error(f"need --rounds >= 2, 1 <= --processes <= the smallest K and 0 < --fraction <= 1, got "
                     f"{args.rounds}, {args.processes} and {args.fraction}")
    return args


def earlier_results(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results, the invocations that measured them) already in --out, which must have been measured alike."""
    earlier = json.loads(args.out.read_text())
    settings = {"rounds": args.rounds, "processes": args.processes}
    differing = {key: earlier.get(key) for key, value in settings.items() if earlier.get(key) != value}
    differing.update({key: r[key] for r in earlier["results"] for key, value in
                      (("fraction", args.fraction), ("model", args.model)) if r[key] != value})
    if differing:
        raise SystemExit(f"--append: {args.out} was measured with {differing}, not like these points")
    return earlier["results"], earlier.get("invocations", [{key: earlier[key] for key in run_info() if key in earlier}])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kept, invocations = earlier_results(args) if args.append else ([], [])
    info = run_info()
    started = time.monotonic()

    runs = [*invocations, info]
    # What a rendered table says it came from: every command, the first start and the highest load at the start
    # of an invocation or of a point.
    header = {**info, "command": " && ".join(run["command"] for run in runs), "started_utc": runs[0]["started_utc"],
              "load_average_1m": max(run["load_average_1m"] for run in runs)}

    def write(results: list[dict[str, Any]]) -> None:
        results.sort(key=lambda result: result["workers"])  # --append may add a smaller K after a larger one
        mark_same_final_models(results)
        busiest = max([header["load_average_1m"], *(result["load_average_1m"] for result in results)])
        write_json(args.out, {"benchmark": "thousands", "delta": DELTA, "local_lr": LOCAL_LR, "rounds": args.rounds,
                              "processes": args.processes, **header, "load_average_1m": busiest,
                              "wall_seconds": time.monotonic() - started,
                              "invocations": runs, "results": results, "growth": growth(results)})

    results = kept + measure(args.points, args.rounds, args.fraction, args.model, args.processes, args.work_dir,
                             lambda new: write(kept + new), args.log_level)
    write(results)
    print(table(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
