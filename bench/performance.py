"""Every benchmark in one command, and docs/PERFORMANCE.md written from their results.

Runs bench.transport, bench.scalar_path, bench.overhead, bench.lab (root
only), bench.scale, bench.profile, bench.ingest, bench.footprint and bench.thousands one after
another (each writes runs/bench/<name>.json), then renders the document:
the machine, each benchmark's table, its target and verdict, the exact command
that produced it and plots. --render rebuilds the document from the JSON files
already there, so a benchmark can be re-run alone and the document refreshed; a benchmark
without results here keeps its section as the document had it, and sections that no
benchmark writes (the prose around the tables) are kept as written.
Full sizes take about an hour on two cores; --quick runs tiny sizes (what CI
does) and writes next to the JSON files instead of over docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.common import run_main

RESULTS_DIR = Path("runs/bench")
NEEDS_ROOT = {"lab"}  # network namespaces

@dataclass(frozen=True)
class Benchmark:
    name: str  # bench.<name>, writing runs/bench/<name>.json
    title: str
    target: str
    quick_args: tuple[str, ...]  # tiny sizes: seconds, for CI
    reading: str  # how to read the table: what is measured and what limits it


BENCHMARKS = (
    Benchmark("transport", "1. Transport: FullGradient upload vs a raw TCP socket",
              "gRPC at >= 60% of raw-socket throughput at 10M and 100M values",
              ("--sizes", "100k", "--repeats", "1"),
              "The gRPC column is a real upload (the worker's one-copy encoding, gRPC, the server's parsing) "
              "timed until the ack. *Bare gRPC* streams the same serialized bytes into a method that only "
              "counts them: the floor grpcio's Python stack sets before any project code runs. *Encode* and "
              "*parse* time the project's two halves alone, in one process."),
    Benchmark("scalar_path", "2. Scalar path: bytes of an all-scalar round and ScalarUpdate latency",
              "<= 2x the information per unit plus a fixed part under 100 bytes",
              ("--models", "mlp", "--calls", "20", "--warmup", "2"),
              "Bytes are the server's own accounting of a header plus one packed ScalarUpdate for every "
              "parameter tensor of the model; latency is one such upload's round trip over loopback."),
    Benchmark("overhead", "3. System overhead: the gRPC system vs the in-process simulation",
              "the gRPC system within 1.25x of the simulation, with the same final model",
              ("--model", "mlp", "--workers", "2", "--rounds", "2", "--embedded"),
              "Both run the same experiment (CNN, 3 classes per worker, reference preset, delta 0.2) in the "
              "same invocation; seconds per round are medians of rounds 2 onwards, and the final models are "
              "compared parameter by parameter. Below 1x means the system is faster: its worker processes "
              "train in parallel, one per core, while the simulation trains the workers one after another "
              "(with one torch thread per core), so the system's gRPC and serialization cost is hidden "
              "behind the parallelism it gains."),
    Benchmark("lab", "4. Bandwidth-limited time to accuracy: LBGM vs delta = 0 in the network lab",
              "LBGM at least 2x faster to the target accuracy with 10 Mbit/s uplinks",
              ("--config", "configs/default.toml", "--hosts", "2", "--workers", "4", "--rounds", "2",
               "--uplinks", "100mbit", "--target-accuracy", "0.1"),
              "Each worker host is a network namespace whose uplink is capped with tbf; both runs of one cap "
              "follow each other. Times run from the start of round 1 to the first round at the target. The "
              "speed-up could reach the ratio of uplink bytes only if moving bytes were all a round does. "
              "Here the 20 workers share 2 cores, so each host trains its 10 workers one after another, and "
              "a round in which every worker sends scalars still takes the seconds shown in the median "
              "column (training, evaluation, the model download). Saving bandwidth cannot remove that floor. "
              "On a slower link it weighs less. A command ending in `--reuse-runs` summarized run folders "
              "that `python -m bench.lab` with the same options had made before, so the start time and load "
              "under the table are the summary's."),
    Benchmark("scale", "5. Scale: server memory and round time against the number of workers",
              "mirrors = K model copies; a compact-mirror option and what it saves",
              ("--workers", "2", "4", "--rounds", "2", "--processes", "1"),
              "The server holds one look-back gradient per worker and layer, stored exactly as it travelled, "
              "so `wire_dtype = \"float16\"` halves both the uplink and the mirrors. An accepted upload is "
              "held as its payloads and scalars (a scalar layer points at the mirror), and rho x LBG is made "
              "one layer at a time while the aggregation adds it, so a round adds no K model copies of its "
              "own. What grew besides the mirrors was the allocator: glibc raises its mmap threshold to the "
              "largest block freed, after which model-sized buffers live in per-thread heaps that keep what "
              "was freed. *pinned* (`lbgm server --malloc-mmap-threshold 131072`) fixes the threshold: peak "
              "RSS then grows by the mirrors plus about half a model per worker, but rounds get longer "
              "(fresh pages for every buffer), so glibc's adaptive threshold stays the default."),
    Benchmark("profile", "6. Profile: the system's own work per round, and the fixes it led to",
              "find the hot paths and fix what they show, with before/after",
              ("--workers", "2", "--repeats", "1", "--top", "5"),
              "Every step a round adds on top of local training, timed in one process for an all-full CNN "
              "round, then cProfile's top functions. It pointed at three fixes, each timed side by side with "
              "the code it replaced: the uplink encoding (four copies of every tensor byte, now one), the "
              "server's NaN/Inf check of every uploaded layer (a boolean mask, now one pass over the "
              "extremes) and the server's parsing of uploads (every chunk copied three times, now once: "
              "see 7). The step timings are after all three."),
    Benchmark("ingest", "7. Server ingest: K workers uploading at once vs grpcio's floor",
              "the server's ingest at >= 80% of grpcio's floor measured in the same run",
              ("--sizes", "100k", "--workers", "2", "--repeats", "1"),
              "K client processes each stream one dense FullGradient of N values into the real server (its "
              "options, CallGuard, AggregatorService and a Coordinator with K workers joined and its round "
              "driver running, for a one-layer model of N values), all released at once when the round is "
              "open; the clock runs from the first message of the first stream to the last ack. Inside it: "
              "gRPC, authentication, reading the parts into tensors with every structural check and the "
              "byte accounting, judging (with the NaN/Inf check) and installing the mirrors. The floor: "
              "the same processes stream the same bytes into a method that only counts them, on a second "
              "server in the same process, after the round is aggregated. Server CPU is the server "
              "process's CPU seconds per GB of payload while the streams ran."),
    Benchmark("footprint", "8. Footprint: memory and CPU of the whole federation vs the compute floor",
              "the Flower job's default command in <= 1.5 GB of summed PSS and <= 1.5x the floor's CPU-seconds "
              "per round; the memory each added virtual worker costs, stated",
              ("--quick",),
              "`lbgm run` on configs/flower-comparison.toml (CNN on MNIST, 10 workers x 3 classes, tau 5, "
              "batch 32, delta 0.2 both ways), the default command and other --processes one after another. "
              "Every 0.2 s the proportional set size (shared pages counted once over all processes) and the "
              "CPU time of every process of the run (the launcher, which never loads torch; its check, a child "
              "that loads torch for a second or two to check the devices and the task before anything starts; "
              "the server; the worker processes) are read from /proc; role columns are each role's own peak, "
              "not simultaneous; wall and CPU-seconds per round are means of rounds 2..R. The floor is the "
              "same training and the same central evaluations in one process without transport "
              "(lbgm.sim.federation.simulate, one torch thread), in the same invocation. The last table is the "
              "default command at more virtual workers (3 rounds each): the slope is what each added worker "
              "costs."),
    Benchmark("thousands", "9. Thousands of workers: one server, 10% sampled, mirrors in RAM or on disk",
              "1,000 and 5,000 virtual workers, 10% sampled per round: server memory, round time and memory "
              "per worker with and without `--mirrors disk`; how far one server goes and what limits it",
              ("--points", "4:own:memory", "4:shared:disk", "--rounds", "2", "--processes", "1"),
              "Each row is a real federation (`lbgm run --mirrors memory|disk`, 2 worker processes) of the "
              "MNIST CNN (1.72 MB per mirror) on mnist-embedded, 10% of the K workers sampled per round, 4 "
              "rounds, delta 0.2, checkpoints off. A worker holds a mirror once it was first sampled, so after 4 "
              "rounds about 34% do (the column says how many). *own* worker models is the built-in task, one "
              "CNN per virtual worker; *shared* is the same task with one model per worker process "
              "(bench/shared_model_task.py), and it ends with the same final model. Server RSS is the server's "
              "own figure when each round closes; PSS is sampled every half second. *RSS per mirror byte* is "
              "the slope of the server's RSS against its mirror bytes over the rounds of a run. The CPU columns "
              "count CPU-seconds from round 1's close to round R's, per round; the server's share of a core is "
              "its CPU time over that wall time. "
              "Until issue 18 the server woke every waiting long poll on each join and each poll that ended, "
              "O(K) thread wake-ups per event: joins crawled (3,154 of 5,000 in 12.5 minutes) and gRPC "
              "cancelled calls the starved server had not accepted within 30 s, which ended virtual workers "
              "with CANCELLED. Each poll now waits on a condition of its own (2,000 workers joined in 6.4 s; "
              "K = 1,000 with disk mirrors, back to back: rounds of 8.3 s before, 3.2 s after) and workers "
              "retry CANCELLED. "
              "At K = 5,000 each worker process hosts 2,500 virtual workers, each a thread idle in a long poll "
              "on a channel of its own. With grpcio's default unary-stream calls every channel also had a "
              "polling thread and every reader woke every 0.1 s: about 4,700 threads and 83,000-107,000 context "
              "switches a second per worker process, and the joins stalled at 4,877 of 5,000. Worker channels "
              "now read GetTask's stream on the calling thread (grpcio's SingleThreadedUnaryStream option): "
              "both K = 5,000 rows ran with the code as it is, all 5,000 joined in 42-57 s, at about 48,000 "
              "context switches a second over both worker processes. "
              "What limits K = 5,000 here is the 2-core machine, not the server's memory: a round of 113 s "
              "took 49 CPU-s in the server (0.43 of a core; 0.37 at K = 1,000) and 115 in the worker processes "
              "(1.0 core), about 1.45 cores between them while a clean-clone CI run shared the machine. The "
              "worker processes, which simulate the 5,000 workers, are the largest consumer. Per sampled "
              "worker that is 99 ms in the server and 230 ms in the worker processes, against 20 and 27 ms at "
              "K = 1,000: costs that grow with the idle workers, not the sampled ones (the worker processes' "
              "context switches, column). Each of the 4,500 unsampled workers "
              "re-polls every 30 s (the workers ask for 60 s, the server holds a poll 30 s at most), about 17,000 idle "
              "polls per round, and polls the busy server had not accepted within gRPC's 30 s were cancelled "
              "and asked again (about 80,000 CANCELLED in the worker logs of the disk run); the heaviest "
              "server thread used 7-18% of a core, the rest spread over its threads. Memory is not the limit "
              "at 5,000: 3.0 GB of mirrors for 1,738 workers cost the server 1.03 bytes of RSS per mirror byte "
              "in RAM (4.4 GB peak) and 0.14 with `--mirrors disk` (2.4 GB peak). "
              "One server's own costs at K = 1,000 (this run, load 8-10): 20 ms of CPU per sampled worker "
              "with mirrors in RAM and 35 ms on disk (its Python threads share one GIL, so about 30-50 "
              "sampled workers a second per server), 1.0 byte of RSS per mirror byte in RAM and 0.4 on disk; "
              "the worker processes cost 27-32 ms of CPU per sampled worker and 1.9-2.0 MB per virtual worker "
              "with shared models (own models: 2.3 MB more each at K = 1,000)."),
)


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(memory / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "grpcio": grpc.__version__}


def run(benchmark: Benchmark, quick: bool, results_dir: Path) -> None:
    if benchmark.name in NEEDS_ROOT and os.geteuid() != 0:
        print(f"\n== bench.{benchmark.name} skipped: it needs root", flush=True)
        return
    module = importlib.import_module(f"bench.{benchmark.name}")
    args = [*(benchmark.quick_args if quick else ()), "--out", str(results_dir / f"{benchmark.name}.json")]
    print(f"\n== bench.{benchmark.name} {' '.join(args)}", flush=True)
    module.main(args)


def previous_sections(document: Path) -> dict[str, str]:
    """The document's sections by heading line, as last written: a render keeps a benchmark's section
    when this machine holds no results for it (runs/bench/ is not committed, so a benchmark measured
    elsewhere keeps its table, command and date), and keeps hand-written sections as they are."""
    if not document.exists():
        return {}
    sections: dict[str, str] = {}
    heading = None
    for line in document.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            heading = line.rstrip("\n")
            sections[heading] = ""
        if heading is not None:
            sections[heading] += line
    return {title: text.rstrip("\n") + "\n" for title, text in sections.items()}


def heading(benchmark: Benchmark) -> str:
    return f"## {benchmark.title}"


def section(benchmark: Benchmark, results_dir: Path, doc_dir: Path, previous: dict[str, str]) -> str:
    path = results_dir / f"{benchmark.name}.json"
    if not path.exists():
        return previous.get(heading(benchmark),
                            f"{heading(benchmark)}\n\nNot measured yet: `python -m bench.{benchmark.name}`.\n")
    result = json.loads(path.read_text())
    module = importlib.import_module(f"bench.{benchmark.name}")
    lines = [heading(benchmark), "", f"Target: {benchmark.target}.", "", benchmark.reading, "",
             module.table(result["results"]), "",
             f"Command: `{result['command']}` (started {result['started_utc']}, 1-minute load average "
             f"{result['load_average_1m']:.2f} on {result['cpu_count']} cores).", ""]
    if hasattr(module, "plot"):
        image = doc_dir / "performance" / f"{benchmark.name}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        module.plot(result["results"], image)
        lines += [f"![{benchmark.name}](performance/{image.name})", ""]
    return "\n".join(lines)


SUMMARY = "## Summary"


def summary(results_dir: Path, previous: dict[str, str]) -> str:
    """Each benchmark's verdict in one line, from its own `verdict` over its results (or the line the
    document had, when this machine holds no results for it)."""
    lines = [SUMMARY, ""]
    for benchmark in BENCHMARKS:
        path = results_dir / f"{benchmark.name}.json"
        start = f"- **{benchmark.title.split(':')[0]}** ({benchmark.name}): "
        if path.exists():
            module = importlib.import_module(f"bench.{benchmark.name}")
            lines.append(start + module.verdict(json.loads(path.read_text())["results"]))
        else:
            kept = [line for line in previous.get(SUMMARY, "").splitlines() if line.startswith(start)]
            lines.append(kept[0] if kept else start + "not measured yet.")
    lines.append("")
    return "\n".join(lines)


def render(results_dir: Path, out: Path) -> None:
    facts = machine()
    header = [
        "# Performance", "",
        "Generated by `python -m bench.performance` from the JSON files in runs/bench/; every number is from "
        "the command printed under its table. Throughputs and times are medians of repeated runs; the "
        "machines are shared and noisy, so compare the ratios measured side by side in one run.", "",
        f"Machine of the last render: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gb']} GB RAM; "
        f"{facts['os']}; Python {facts['python']}, torch {facts['torch']}, grpcio {facts['grpcio']}. A section "
        "whose results were measured on an earlier machine is kept as it was rendered there; the line under "
        "each table gives its command, date and load.", "",
    ]
    previous = previous_sections(out)
    generated = {SUMMARY, *(heading(benchmark) for benchmark in BENCHMARKS)}
    written_by_hand = [text for title, text in previous.items() if title not in generated]
    body = [summary(results_dir, previous), *written_by_hand,
            *(section(benchmark, results_dir, out.parent, previous) for benchmark in BENCHMARKS)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + body))
    print(f"wrote {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.performance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run from the repository root.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (seconds); results and document go to --results-dir")
    parser.add_argument("--render", action="store_true", help="only rebuild the document from existing results")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], metavar="NAME",
                        help=f"run only these benchmarks: {', '.join(b.name for b in BENCHMARKS)} (default: all)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"where the JSON results go (default: {RESULTS_DIR}, or {RESULTS_DIR}/quick with "
                             "--quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the document (default: docs/PERFORMANCE.md, or PERFORMANCE.md in the results folder "
                             "with --quick)")
    args = parser.parse_args(argv)
    args.results_dir = args.results_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    args.out = args.out or (args.results_dir / "PERFORMANCE.md" if args.quick else Path("docs/PERFORMANCE.md"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.render:
        for benchmark in BENCHMARKS:
            if args.only is None or benchmark.name in args.only:
                run(benchmark, args.quick, args.results_dir)
    render(args.results_dir, args.out)


if __name__ == "__main__":
    run_main(main)
