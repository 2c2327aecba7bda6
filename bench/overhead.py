"""System overhead: the gRPC federation against an in-process simulation of the same math.

For each worker count, one experiment (the authors' CNN, label shards with 3
classes per worker, the reference preset: one full-shard step, local lr 0.01,
server momentum 0.9; LBGM with delta 0.2 and error feedback) runs twice in the
same invocation:

- as the real system: `lbgm run`'s server process and worker processes over
  localhost gRPC (run_federation), with the server's checkpoints as configured;
- as lbgm.sim.federation.simulate in this process: the same trainer, encoder,
  judge and aggregation called directly, no serialization and no network.

Time per round is the wall time between two consecutive round closes for the
system (the server's elapsed_seconds: training, upload, aggregation, test-set
evaluation, model encoding and checkpointing) and the simulated round's wall
time (training, judging, aggregation and the same evaluation); the medians of
rounds 2..R are compared, since round 1 of the system also waits for workers to
start. Both must end with the same model: the largest parameter difference is
reported and checked against a float tolerance.

The system uses one torch thread per worker process and as many worker
processes as cores (--processes); the simulation uses as many torch threads as
cores, so each side has the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.state_files import load
from lbgm.launch.federation import run_federation
from lbgm.sim.federation import simulate

from bench.common import markdown_table, run_info, run_main, write_json

TARGET_RATIO = 1.25  # the bar: the gRPC system within 1.25x of the simulation
# Same math, different summation order only where floats allow it: both sides must agree this closely.
RELATIVE_TOLERANCE = 1e-4
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def experiment(model: str, workers: int, rounds: int, data_dir: Path | None, checkpoint_every: int) -> ExperimentConfig:
    """The paper's MNIST setting at `workers` workers; the 12k-image embedded MNIST without data_dir."""
    dataset = {"dataset": "mnist", "data_dir": str(data_dir)} if data_dir else {"dataset": "mnist-embedded"}
    return ExperimentConfig(name=f"overhead-k{workers}", model=model, partition="shards", classes_per_worker=3,
                            workers=workers, rounds=rounds, local_steps=1, batch_size=0, local_lr=0.01,
                            server_momentum=0.9, delta=0.2, error_feedback=True, round_timeout=3600.0,
                            checkpoint_every=checkpoint_every, **dataset)


def system_rounds(config: ExperimentConfig, work_dir: Path, processes: int) -> tuple[list[float], list[torch.Tensor]]:
    """Per-round wall seconds (between round closes) of a real `lbgm run`, and its final parameters."""
    run_dir = work_dir / config.name
    shutil.rmtree(run_dir, ignore_errors=True)
    status = run_federation(config, work_dir, processes, "WARNING", "text")
    if status != 0:
        raise RuntimeError(f"the gRPC run failed with status {status}; logs in {run_dir / 'logs'}")
    records = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    elapsed = [float(json.loads(line)["elapsed_seconds"]) for line in records]
    seconds = [elapsed[0], *(later - earlier for earlier, later in zip(elapsed, elapsed[1:]))]
    return seconds, load(run_dir / "final_model.pt")["params"]


def compare(config: ExperimentConfig, work_dir: Path, processes: int) -> dict[str, Any]:
    system_seconds, system_params = system_rounds(config, work_dir, processes)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        simulated = simulate(config, evaluate_every_round=True)
    finally:
        torch.set_num_threads(threads)
    sim_seconds = [record["round_seconds"] for record in simulated.rounds]
    largest_difference = max(float((a - b).abs().max()) for a, b in zip(system_params, simulated.params, strict=True))
    largest_value = max(float(p.abs().max()) for p in simulated.params)
    system_median = statistics.median(system_seconds[1:])
    sim_median = statistics.median(sim_seconds[1:])
    ratio = system_median / sim_median
    return {
        "model": config.model, "workers": config.workers, "rounds": config.rounds, "dataset": config.dataset,
        "processes": processes,
        "checkpoint_every": config.checkpoint_every,
        "system_round_seconds": system_seconds, "sim_round_seconds": sim_seconds,
        "system_median_seconds": system_median, "sim_median_seconds": sim_median,
        "ratio": ratio, "meets_target": ratio <= TARGET_RATIO,
        "max_param_difference": largest_difference, "max_param_magnitude": largest_value,
        "models_agree": largest_difference <= RELATIVE_TOLERANCE * largest_value,
        "final_accuracy_sim": simulated.rounds[-1]["test_accuracy"],
    }


def verdict(results: list[dict[str, Any]]) -> str:
    """One line for the document's summary."""
    ratios = ", ".join(f"{r['workers']} workers {r['ratio']:.2f}x" for r in results)
    agree = all(r["models_agree"] for r in results)
    met = all(r["meets_target"] for r in results)
    return (f"gRPC system / simulation seconds per round: {ratios}; final models "
            f"{'agree' if agree else 'DIFFER'}. " + ("Target met." if met and agree else "Target missed."))


def table(results: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["model", "workers", "data", "rounds", "gRPC s/round", "simulation s/round", "gRPC / sim",
         f"<= {TARGET_RATIO}x",
         "largest param difference", "models agree"],
        [[r["model"], r["workers"], r["dataset"], r["rounds"], f"{r['system_median_seconds']:.2f}",
          f"{r['sim_median_seconds']:.2f}", f"{r['ratio']:.2f}x", "met" if r["meets_target"] else "missed",
          f"{r['max_param_difference']:.1e}", "yes" if r["models_agree"] else "NO"] for r in results])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.overhead --workers 10 --rounds 3")
    parser.add_argument("--model", default="cnn", help="model to train (default: cnn, the issue's setting)")
    parser.add_argument("--workers", nargs="+", type=int, default=[10, 50], metavar="K",
                        help="worker counts to compare (default: 10 50)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run; rounds 2.. are timed (default: 4)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None,
                        help="folder with the official MNIST files; without it the embedded 12k-image subset is "
                             "used (default: ../shared/data when it exists)")
    parser.add_argument("--embedded", action="store_true", help="use the embedded MNIST subset even if --data-dir "
                                                                "is available (quick runs)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="worker processes of the gRPC system (default: one per core)")
    parser.add_argument("--checkpoint-every", type=int, default=ExperimentConfig.checkpoint_every,
                        help="server checkpoint interval in rounds, 0 for none (default: the system's default, "
                             f"{ExperimentConfig.checkpoint_every})")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench/overhead-runs"),
                        help="parent folder of the gRPC runs' folders (default: runs/bench/overhead-runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead.json"),
                        help="JSON result file (default: runs/bench/overhead.json)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (round 1 is not timed), got {args.rounds}")
    if args.embedded:
        args.data_dir = None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = run_info()
    results = []
    for workers in args.workers:
        config = experiment(args.model, workers, args.rounds, args.data_dir, args.checkpoint_every)
        results.append(compare(config, args.work_dir, min(args.processes, workers)))
        print(table(results[-1:]), flush=True)
    print(table(results))
    write_json(args.out, {"benchmark": "overhead", "target_ratio": TARGET_RATIO,
                          "relative_tolerance": RELATIVE_TOLERANCE, **info, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
