"""Footprint: memory and CPU of a whole `lbgm run` federation, against the compute floor (issue 18, 1 and 5).

Runs the Flower job (configs/flower-comparison.toml: the CNN on MNIST, 10 workers x 3 classes, tau 5,
batch 32, 20 rounds, delta 0.2 both ways) with the default command, `lbgm run --config ... --data-dir
...`, and side by side with other --processes. Every --interval seconds it reads, for every process of
the run's tree (the `lbgm run` launcher; its check, the short-lived child that loads torch to check the
devices and the task before anything starts, launch/preflight.py; the server; the worker processes):

- the proportional set size (Pss of /proc/<pid>/smaps_rollup: shared pages such as libtorch's code
  count once over all processes), summed: the peak of that sum is the run's memory; the peak of each
  role's sum (launcher, check, server, workers) and of its largest process say where it goes;
- CPU time: utime + stime + cutime + cstime of /proc/<pid>/stat (a child that exited and was reaped
  counts in its parent's cutime), summed.

Round ends are the moments the server's metrics.jsonl gains a line, so wall and CPU-seconds per round
are (value when round R closed - value when round 1 closed) / (R - 1): startup and round 1 (every
worker loads its data and sends every layer in full) stay out.

The floor is the same work in one process with no transport: lbgm.sim.federation.simulate of the same
config (the same shards, local training with one torch thread as `lbgm worker` trains, the same
LBGM decisions, the same central evaluations of the test set: after the aggregation and again after
the downlink's rebuild, as the server does), in a spawned child whose CPU time is read at the end of
every round. The system's CPU-seconds per round over the floor's is the overhead ratio (target 1.5x).

Last, the memory each added virtual worker costs: the default command at --scan-workers counts
(fewer rounds), peak PSS against the worker count, least-squares slope per role.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import chart, markdown_table, run_info, run_main, write_json

TARGET_PEAK_BYTES = 1.5e9
TARGET_RATIO = 1.5
DEFAULT_DATA_DIR = Path("../shared/data")
ROLES = ("launcher", "check", "server", "workers")
MB = 1e6
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    seconds: float  # since the launcher started
    pss_by_pid: dict[int, int]  # bytes
    role_by_pid: dict[int, str]
    cpu_seconds: float  # the whole tree, cumulative
    cpu_seconds_by_role: dict[str, float]
    rounds_recorded: int


@dataclass
class Trace:
    samples: list[Sample] = field(default_factory=list)

    def peak(self, role: str | None = None) -> int:
        """Largest summed PSS over the samples (of one role's processes, or of all)."""
        return max((sum(pss for pid, pss in s.pss_by_pid.items() if role is None or s.role_by_pid[pid] == role)
                    for s in self.samples), default=0)

    def largest_process(self, role: str) -> int:
        return max((pss for s in self.samples for pid, pss in s.pss_by_pid.items() if s.role_by_pid[pid] == role),
                   default=0)

    def round_ends(self) -> list[Sample]:
        """For each round, the first sample that saw its metrics line."""
        ends: list[Sample] = []
        for sample in self.samples:
            while len(ends) < sample.rounds_recorded:
                ends.append(sample)
        return ends


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(root: int) -> list[int]:
    tree = children_of()
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(tree.get(pid, []))
    return found


def role_of(pid: int) -> str | None:
    """launcher, check, server or workers from the command line; None for anything else (never the case today)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"lbgm.launch.preflight" in argv:
        return "check"
    if b"lbgm.cli" not in argv:
        return None
    command = argv[argv.index(b"lbgm.cli") + 1]
    return {b"run": "launcher", b"server": "server", b"worker": "workers"}.get(command)


def pss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS  # fields 14-17 of proc(5)


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def trace_run(command: Sequence[str], metrics: Path, interval: float, log: Path) -> tuple[Trace, float, float]:
    """Runs `command` (an `lbgm run`) to its end while sampling its tree: the trace, its wall seconds and the
    CPU-seconds of every process it started (reaped, so exact)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    trace = Trace()
    with open(log, "w") as output:
        launcher = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        while launcher.poll() is None:
            pids = descendants(launcher.pid)
            roles = {pid: role_of(pid) for pid in pids}
            pss = {pid: pss_bytes(pid) for pid, role in roles.items() if role is not None}
            live = {pid: value for pid, value in pss.items() if value is not None}
            cpu = {pid: cpu_seconds(pid) for pid in pids}
            trace.samples.append(Sample(
                time.monotonic() - started, live, {pid: roles[pid] for pid in live},  # type: ignore[misc]
                sum(cpu.values()), {role: sum(cpu[pid] for pid in pids if roles[pid] == role) for role in ROLES},
                count_lines(metrics)))
            time.sleep(interval)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if launcher.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with status {launcher.returncode}; see {log}")
    return trace, wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def per_round(values: Sequence[float]) -> float | None:
    """(last - first) / rounds between them: the mean of rounds 2..R."""
    return (values[-1] - values[0]) / (len(values) - 1) if len(values) >= 2 else None


@dataclass(frozen=True)
class RunSettings:
    """What a measured `lbgm run` changes on the config: None keeps the config's value (or the default)."""

    processes: int | None = None
    workers: int | None = None
    rounds: int | None = None

    def flags(self) -> list[str]:
        return [part for flag, value in (("--processes", self.processes), ("--workers", self.workers),
                                         ("--rounds", self.rounds)) if value is not None
                for part in (flag, str(value))]


def lbgm_run(config: Path, data_dir: Path | None, out_dir: Path, settings: RunSettings) -> list[str]:
    """The command measured: the config's job, on the official files in data_dir or on the embedded subset."""
    data = ["--data-dir", str(data_dir)] if data_dir is not None else ["--dataset", "mnist-embedded"]
    return [sys.executable, "-m", "lbgm.cli", "run", "--config", str(config), "--out-dir", str(out_dir),
            "--log-level", "WARNING", *data, *settings.flags()]


def measure_run(label: str, command: list[str], run_dir: Path, interval: float) -> dict[str, Any]:
    # A folder left by an earlier invocation would show its 20 metrics lines (round ends) before this run's
    # server starts, and its final model if this run failed to write one.
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    trace, wall, total_cpu = trace_run(command, run_dir / "metrics.jsonl", interval, run_dir.parent / f"{label}.log")
    ends = trace.round_ends()
    worker_processes = max((sum(role == "workers" for role in s.role_by_pid.values()) for s in trace.samples),
                           default=0)
    return {
        "label": label, "command": " ".join(command[1:]).replace("-m lbgm.cli", "lbgm"),
        "worker_processes": worker_processes, "rounds": len(ends), "samples": len(trace.samples),
        "peak_pss_bytes": trace.peak(),
        "peak_pss_bytes_by_role": {role: trace.peak(role) for role in ROLES},
        "largest_process_pss_bytes_by_role": {role: trace.largest_process(role) for role in ROLES},
        "wall_seconds": wall, "cpu_seconds_total": total_cpu,
        "wall_seconds_per_round": per_round([s.seconds for s in ends]),
        "cpu_seconds_per_round": per_round([s.cpu_seconds for s in ends]),
        "cpu_seconds_per_round_by_role": {role: per_round([s.cpu_seconds_by_role[role] for s in ends])
                                          for role in ROLES},
        "final_model": str(run_dir / "final_model.pt"),
        "final_accuracy": json.loads((run_dir / "summary.json").read_text())["final_accuracy"],
        "pss_timeline_mb": [[round(s.seconds, 2), round(sum(s.pss_by_pid.values()) / MB, 1)] for s in trace.samples],
    }


def _floor_child(connection: Any, config_path: str, data_dir: str | None) -> None:
    """In a spawned process: simulate the config, sending the CPU-seconds at the end of every round."""
    import torch

    from lbgm.experiment.config import load_config
    from lbgm.sim.federation import simulate

    torch.set_num_threads(1)  # as `lbgm worker` trains (--torch-threads 1): the least CPU for the same sums
    overrides = {"data_dir": data_dir} if data_dir is not None else {}
    config = load_config(Path(config_path), overrides)
    marks = [time.process_time()]
    walls = [time.monotonic()]

    def observe(_: object) -> None:
        marks.append(time.process_time())
        walls.append(time.monotonic())

    result = simulate(config, observe=observe)
    connection.send({"cpu_marks": marks, "wall_marks": walls, "final_accuracy": result.rounds[-1]["test_accuracy"],
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def measure_floor(config: Path, data_dir: Path | None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_floor_child, args=(child_end, str(config),
                                                         str(data_dir) if data_dir is not None else None))
    process.start()
    child_end.close()
    reply = parent_end.recv()
    process.join()
    cpu, wall = reply["cpu_marks"][1:], reply["wall_marks"][1:]  # round ends
    return {"cpu_seconds_per_round": per_round(cpu), "wall_seconds_per_round": per_round(wall),
            "rounds": len(cpu), "peak_rss_bytes": reply["peak_rss_bytes"], "final_accuracy": reply["final_accuracy"]}


def same_final_model(paths: Sequence[str]) -> bool:
    contents = {Path(path).read_bytes() for path in paths}
    return len(contents) == 1


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def megabytes(count: float | None) -> str:
    return "-" if count is None else f"{count / MB:,.0f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    floor = results["floor"]
    runs = markdown_table(
        ["command", "worker processes", "peak PSS MB", "launcher MB", "check MB", "server MB", "workers MB",
         "largest worker MB", "wall s/round", "CPU-s/round", "CPU / floor"],
        [[f"`{r['label']}`", r["worker_processes"], megabytes(r["peak_pss_bytes"]),
          *(megabytes(r["peak_pss_bytes_by_role"][role]) for role in ROLES),
          megabytes(r["largest_process_pss_bytes_by_role"]["workers"]), seconds(r["wall_seconds_per_round"]),
          seconds(r["cpu_seconds_per_round"]), f"{r['cpu_seconds_per_round'] / floor['cpu_seconds_per_round']:.2f}x"]
         for r in results["runs"]]
        + [["floor: one process, no transport", "-", "-", "-", "-", "-", "-", "-",
            seconds(floor["wall_seconds_per_round"]), seconds(floor["cpu_seconds_per_round"]), "1.00x"]])
    lines = [runs, "",
             f"Final models of all --processes runs byte-identical: {'yes' if results['final_models_equal'] else 'NO'}. "
             f"Floor (simulate, one torch thread): peak RSS {megabytes(floor['peak_rss_bytes'])} MB."]
    scan = results.get("scan")
    if scan:
        lines += ["", markdown_table(
            ["virtual workers", "worker processes", "peak PSS MB", "launcher MB", "check MB", "server MB",
             "workers MB"],
            [[r["workers"], r["worker_processes"], megabytes(r["peak_pss_bytes"]),
              *(megabytes(r["peak_pss_bytes_by_role"][role]) for role in ROLES)] for r in scan["runs"]]),
            "", "Each added virtual worker: " + ", ".join(
                f"{name} {megabytes(value)} MB" for name, value in scan["slope_bytes_per_worker"].items()) + "."]
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> str:
    default = results["runs"][0]
    ratio = default["cpu_seconds_per_round"] / results["floor"]["cpu_seconds_per_round"]
    met = default["peak_pss_bytes"] <= TARGET_PEAK_BYTES and ratio <= TARGET_RATIO
    per_worker = (results.get("scan") or {}).get("slope_bytes_per_worker", {}).get("total")
    return (f"default command peak {megabytes(default['peak_pss_bytes'])} MB PSS, "
            f"{default['cpu_seconds_per_round']:.2f} CPU-s/round = {ratio:.2f}x the floor"
            + (f"; {megabytes(per_worker)} MB per added virtual worker" if per_worker is not None else "")
            + (". Targets met." if met else ". Target missed."))


def plot(results: dict[str, Any], path: Path) -> None:
    with chart(path, "Summed PSS of the federation's processes", "seconds since start", "MB") as axes:
        for run in results["runs"]:
            axes.plot(*zip(*run["pss_timeline_mb"]), label=run["label"])
        axes.axhline(TARGET_PEAK_BYTES / MB, linestyle="--", color="grey", label="target")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.footprint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.footprint --processes 1 2 10")
    parser.add_argument("--config", type=Path, default=Path("configs/flower-comparison.toml"),
                        help="the job (default: configs/flower-comparison.toml)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None,
                        help="folder with the official MNIST files (default: ../shared/data when it exists)")
    parser.add_argument("--processes", nargs="*", type=int, default=[1, 2, 10], metavar="P",
                        help="--processes to run besides the default command (default: 1 2 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the config's)")
    parser.add_argument("--workers", type=int, default=None, help="workers per run (default: the config's)")
    parser.add_argument("--scan-workers", nargs="*", type=int, default=[10, 20, 40], metavar="K",
                        help="virtual worker counts for the per-worker memory, default command (default: 10 20 40)")
    parser.add_argument("--scan-rounds", type=int, default=3, help="rounds of each scan run (default: 3)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default: 0.2)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds, for CI: the embedded MNIST subset, 2 workers, 2 rounds, the default command "
                             "only, scanning 1 and 2 workers (the latter is the default run)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench/footprint-runs"),
                        help="parent folder of the runs (default: runs/bench/footprint-runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/footprint.json"),
                        help="JSON result file (default: runs/bench/footprint.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.data_dir, args.workers, args.rounds, args.processes, args.scan_workers, args.scan_rounds = \
            None, 2, 2, [], [1, 2], 2
    if args.rounds is not None and args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (round 1 is not timed), got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = run_info()
    config_name = next(line.split("=", 1)[1].strip().strip('"') for line in args.config.read_text().splitlines()
                       if line.startswith("name"))
    measured: dict[RunSettings, dict[str, Any]] = {}

    def measure(label: str, settings: RunSettings) -> dict[str, Any]:
        """One run per settings: a scan point equal to a compared run is that run."""
        if settings not in measured:
            out_dir = args.work_dir / "-".join(["run", *settings.flags()]).replace("--", "")
            measured[settings] = measure_run(label, lbgm_run(args.config, args.data_dir, out_dir, settings),
                                             out_dir / config_name, args.interval)
            print(f"{label}: peak {megabytes(measured[settings]['peak_pss_bytes'])} MB, "
                  f"{seconds(measured[settings]['cpu_seconds_per_round'])} CPU-s/round", flush=True)
        return measured[settings]

    runs = [measure("default" if processes is None else f"--processes {processes}",
                    RunSettings(processes, args.workers, args.rounds)) for processes in [None, *args.processes]]
    floor_config = Path(runs[0]["final_model"]).parent / "config.toml"  # the default run's settings, as written
    floor = measure_floor(floor_config, args.data_dir)
    scan_runs = [{"workers": workers, **{key: value for key, value in measure(
        f"{workers} workers", RunSettings(None, workers, args.scan_rounds)).items() if key != "pss_timeline_mb"}}
        for workers in args.scan_workers]
    scan = {"runs": scan_runs, "slope_bytes_per_worker": {
        role: slope([(r["workers"], r["peak_pss_bytes_by_role"][role]) for r in scan_runs]) for role in ROLES}
        | {"total": slope([(r["workers"], r["peak_pss_bytes"]) for r in scan_runs])}}
    results = {"runs": runs, "floor": floor, "final_models_equal": same_final_model([r["final_model"] for r in runs]),
               "scan": scan}
    print(table(results))
    write_json(args.out, {"benchmark": "footprint", "target_peak_bytes": TARGET_PEAK_BYTES,
                          "target_ratio": TARGET_RATIO, **info, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
