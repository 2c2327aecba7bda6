"""Server ingest: K workers upload a full gradient at once, against grpcio's own floor.

One server process with the real options and assembly (lbgm.server.app.start_server:
SERVER_OPTIONS, 3K + 8 pool threads, the CallGuard interceptor, AggregatorService) and a
real Coordinator whose model is one float32 layer of N values (a weights file: no data,
no evaluation), with K workers joined and its round driver running (fraction 1, delta 0,
no checkpoints). K client processes (bench.ingest_client: separate OS processes, so not
one GIL) each stream one dense FullGradient of N values, the bytes
lbgm.common.wire.serialized_update_parts makes, in 1 MiB chunk parts, all K released
at once as soon as the round is open.

Inside the clock (first message of the first stream to the last ack): gRPC receiving
every message, the CallGuard's per-message stall deadline, authentication from the call
metadata, parsing every part, assembling the payload into tensors, the structural
checks and byte accounting of lbgm.common.wire, judging (judge_update: versions, codec,
dtype, shape, the NaN/Inf check), the byte counters and installing the new mirrors
(Coordinator.submit), and the ack. Outside it: the round's aggregation and the next
round's opening, which the parent waits for (GetStatus) before the floor's repeat and
the next round's. Throughput is payload bytes (K x N x 4) per second, MB/s (10^6 bytes).

The floor, measured in the same run and interleaved repeat by repeat: the same K
processes stream the very same serialized messages into a method that only counts them
(bench.sink: no protobuf, no project code) on a second gRPC server in the same server
process with the same options and pool size. Each repeat also checks the byte
accounting: the server's uplink counter must grow by exactly the serialized size of
every message plus gRPC's 5-byte prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import torch

import bench
import lbgm.common
import lbgm.server

from lbgm.common.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS
from lbgm.common.model_spec import TensorSpec
from lbgm.common.weights import ModelState, write_weights
from lbgm.common.wire import GRPC_FRAME_BYTES, FullLayer, serialized_update_parts
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.app import start_server
from lbgm.server.rounds import Coordinator
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

from bench.common import chart, child_server, markdown_table, median, parse_count, run_info, run_main, \
    wait_for_stop, write_json
from bench.sink import HOST, sink_handler

TARGET_RATIO = 0.8  # issue 18: the server's ingest at >= 80% of grpcio's floor
BYTES_PER_FLOAT = 4
ROUND_TIMEOUT_SECONDS = 600.0
OPEN_ROUND_SECONDS = 600.0  # the parent's wait for the next round (aggregating K x 10M values takes a while)
POLL_SECONDS = 0.02
STACKS_FILE = "stacks.json"
PROJECT_ROOTS = tuple(str(Path(module.__file__).parent) for module in (lbgm.common, lbgm.server, bench))


# ------------------------------------------------------------------ the server process


class StackSampler:
    """Where the server's threads are, every `interval` seconds (py-spy is not installed here): counts of
    each thread's innermost frame and of its innermost frame in the project's code, over the whole run."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.innermost: Counter[str] = Counter()
        self.project: Counter[str] = Counter()
        self.samples = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    @staticmethod
    def _where(frame: FrameType) -> str:
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"

    def _run(self) -> None:
        own = threading.get_ident()
        while not self._stopped.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == own:
                    continue
                self.innermost[self._where(frame)] += 1
                while frame is not None and not any(root in frame.f_code.co_filename for root in PROJECT_ROOTS):
                    frame = frame.f_back
                self.project[self._where(frame) if frame is not None else "(no project frame)"] += 1

    def report(self, top: int = 25) -> dict[str, Any]:
        self._stopped.set()
        self._thread.join()
        return {"samples": self.samples, "interval_seconds": self.interval,
                "innermost": self.innermost.most_common(top), "innermost_project": self.project.most_common(top)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_ingest(connection: Connection, floats: int, workers: int, rounds: int, folder: str,
                 sample_seconds: float) -> None:
    """Child-process entry point (bench.common.child_server): the real server for a one-layer model of
    `floats` values with `workers` joined, and the sink beside it; sends their ports and the workers'
    credentials, then serves until STOP; with sample_seconds > 0, writes what the stack sampler saw to
    STACKS_FILE in `folder`."""
    torch.set_num_threads(1)
    weights = Path(folder) / "model.safetensors"
    write_weights(weights, ModelState((TensorSpec("layer", (floats,), "float32", False),), [torch.zeros(floats)], []))
    # One round more than measured: the driver never finishes, so no final state is written meanwhile.
    config = ExperimentConfig(name="ingest", weights=str(weights), workers=workers, rounds=rounds + 1, delta=0.0,
                              federated_eval_every=0, checkpoint_every=0, round_timeout=ROUND_TIMEOUT_SECONDS)
    coordinator = Coordinator(config, Path(folder) / "run")
    running = start_server(coordinator, HOST, 0)
    joined = [coordinator.join(f"worker-{index}", coordinator.model_tensors)[0] for index in range(workers)]
    sink = grpc.server(futures.ThreadPoolExecutor(max_workers=3 * workers + 8), options=SERVER_OPTIONS)
    sink.add_generic_rpc_handlers((sink_handler(),))
    sink_port = sink.add_insecure_port(f"{HOST}:0")
    sink.start()
    threading.Thread(target=coordinator.run, name="round-driver", daemon=True).start()
    sampler = StackSampler(sample_seconds) if sample_seconds > 0 else None
    connection.send({"port": running.port, "sink_port": sink_port, "pid": os.getpid(),
                     "workers": [(record.worker_id, record.token.hex()) for record in joined]})
    wait_for_stop(connection)
    if sampler is not None:
        (Path(folder) / STACKS_FILE).write_text(json.dumps(sampler.report()))
    sink.stop(grace=0)
    running.stop(grace=0)


# ------------------------------------------------------------------ the clients


def write_payload(floats: int, path: Path) -> list[int]:
    """The upload's bytes for bench.ingest_client (see there); returns every message's serialized size."""
    tensor = torch.randn(floats, generator=torch.Generator().manual_seed(0))
    header = pb.UpdateHeader(worker_id=1, token=bytes(16), round=1, num_samples=1)
    serialized = list(serialized_update_parts(header, [FullLayer.dense(0, 1, tensor)], []))
    full = pb.UpdatePart.FromString(serialized[1]).full
    path.write_bytes(pickle.dumps({"meta": full.parts[0].SerializeToString(), "first": full.data,
                                   "chunks": serialized[2:]}))
    return [len(message) for message in serialized]


class Clients:
    """K bench.ingest_client processes, driven in lockstep over their stdin and stdout."""

    def __init__(self, server: dict[str, Any], payload: Path) -> None:
        self.processes = [subprocess.Popen(
            [sys.executable, "-m", "bench.ingest_client", str(server["port"]), str(server["sink_port"]),
             str(worker_id), token, str(payload)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for worker_id, token in server["workers"]]
        for process in self.processes:
            self._answer(process)  # ready

    def _answer(self, process: subprocess.Popen) -> dict[str, Any]:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"an ingest client exited with status {process.wait()}")
        return json.loads(line)

    def run(self, command: str, round_number: int) -> float:
        """All clients run `command` at once; seconds from the first stream's start to the last reply."""
        for process in self.processes:
            process.stdin.write(f"{command} {round_number}\n")
            process.stdin.flush()
        answers = [self._answer(process) for process in self.processes]
        return max(a["ended"] for a in answers) - min(a["started"] for a in answers)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.stdin.write("quit\n")
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def clients(server: dict[str, Any], payload: Path) -> Iterator[Clients]:
    started = Clients(server, payload)
    try:
        yield started
    finally:
        started.close()


def wait_for_round(stub: pb_grpc.AggregatorStub, number: int) -> pb.StatusReply:
    """Block until round `number` is open (the previous one aggregated)."""
    deadline = time.monotonic() + OPEN_ROUND_SECONDS
    while time.monotonic() < deadline:
        status = stub.GetStatus(pb.StatusRequest(), timeout=10)
        if status.round == number and status.completed_rounds == number - 1:
            return status
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"round {number} did not open within {OPEN_ROUND_SECONDS}s")


# ------------------------------------------------------------------ benchmark


def measure_point(floats: int, workers: int, repeats: int, folder: Path, payload: Path, sizes: list[int],
                  sample_seconds: float) -> dict[str, Any]:
    """Ingest and floor for one (N, K), `repeats` times each, interleaved; with each, the server process's
    CPU seconds."""
    payload_bytes = floats * BYTES_PER_FLOAT * workers
    upload_wire_bytes = sum(size + GRPC_FRAME_BYTES for size in sizes)
    seconds: dict[str, list[float]] = {"ingest": [], "floor": []}
    server_cpu: dict[str, list[float]] = {"ingest": [], "floor": []}
    uplink: list[int] = []
    with ExitStack() as stack:
        server = stack.enter_context(child_server(serve_ingest, floats, workers, repeats, str(folder), sample_seconds))
        channel = stack.enter_context(grpc.insecure_channel(f"{HOST}:{server['port']}", options=CHANNEL_OPTIONS))
        stub = pb_grpc.AggregatorStub(channel)
        running = stack.enter_context(clients(server, payload))

        def timed_run(path: str, command: str, number: int) -> None:
            cpu = cpu_seconds(server["pid"])
            seconds[path].append(running.run(command, number))
            server_cpu[path].append(cpu_seconds(server["pid"]) - cpu)

        before = wait_for_round(stub, 1).uplink_bytes
        for number in range(1, repeats + 1):
            timed_run("ingest", "upload", number)
            # The floor once the round is aggregated and the next one open: the server is idle again.
            after = wait_for_round(stub, number + 1).uplink_bytes
            uplink.append(after - before)
            before = after
            timed_run("floor", "drain", number)
    if any(count != workers * upload_wire_bytes for count in uplink):
        raise RuntimeError(f"the server counted {uplink} uplink bytes per round, expected "
                           f"{workers} x {upload_wire_bytes}")
    megabytes = payload_bytes / 1e6
    result: dict[str, Any] = {"floats": floats, "workers": workers, "payload_bytes": payload_bytes,
                              "messages_per_upload": len(sizes), "uplink_bytes_per_round": uplink[0],
                              "repeats": repeats}
    for path, timings in seconds.items():
        result[f"{path}_seconds"] = timings
        result[f"{path}_mb_per_s"] = median([megabytes / elapsed for elapsed in timings])
        # The server process's CPU time while the K streams ran, per GB of payload (the clients' is not in it).
        result[f"{path}_server_cpu_seconds"] = server_cpu[path]
        result[f"{path}_server_cpu_s_per_gb"] = median(server_cpu[path]) / (payload_bytes / 1e9)
    if sample_seconds > 0:
        result["server_stacks"] = json.loads((folder / STACKS_FILE).read_text())
    result["ratio"] = result["ingest_mb_per_s"] / result["floor_mb_per_s"]
    result["meets_target"] = result["ratio"] >= TARGET_RATIO
    return result


def measure(sizes: Sequence[int], workers: Sequence[int], repeats: int, sample_seconds: float
            ) -> list[dict[str, Any]]:
    results = []
    for floats in sizes:
        with tempfile.TemporaryDirectory(prefix="lbgm-ingest-") as temporary:
            folder = Path(temporary)
            message_sizes = write_payload(floats, folder / "payload.pickle")
            for count in workers:
                point = folder / f"k{count}"
                point.mkdir()
                results.append(measure_point(floats, count, repeats, point, folder / "payload.pickle", message_sizes,
                                             sample_seconds))
                print(f"N={floats:,} K={count}: ingest {results[-1]['ingest_mb_per_s']:,.0f} MB/s, "
                      f"floor {results[-1]['floor_mb_per_s']:,.0f} MB/s ({results[-1]['ratio']:.0%})", flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["floats per upload", "workers K", "payload MB (all K)", "repeats", "server ingest MB/s",
         "grpcio floor MB/s", "ingest / floor", f"target >= {TARGET_RATIO:.0%}", "server CPU s/GB: ingest",
         "floor"],
        [[f"{r['floats']:,}", r["workers"], f"{r['payload_bytes'] / 1e6:,.0f}", r["repeats"],
          f"{r['ingest_mb_per_s']:,.0f}", f"{r['floor_mb_per_s']:,.0f}", f"{r['ratio']:.0%}",
          "met" if r["meets_target"] else "missed", f"{r['ingest_server_cpu_s_per_gb']:.2f}",
          f"{r['floor_server_cpu_s_per_gb']:.2f}"] for r in results])


def verdict(results: list[dict[str, Any]]) -> str:
    """One line for the document's summary."""
    shares = ", ".join(f"N={r['floats']:,} K={r['workers']}: {r['ratio']:.0%}" for r in results)
    met = all(r["meets_target"] for r in results)
    return f"Server ingest / grpcio floor: {shares}. " + ("Target met." if met else "Target missed where below.")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Ingest and floor MB/s against K, one pair of lines per upload size."""
    with chart(path, "Concurrent full uploads into one server", "workers uploading at once (K)",
               "MB/s (median, all K streams)") as axes:
        for floats in sorted({r["floats"] for r in results}):
            points = [r for r in results if r["floats"] == floats]
            ks = [r["workers"] for r in points]
            line, = axes.plot(ks, [r["floor_mb_per_s"] for r in points], "--", marker="o",
                              label=f"grpcio floor, {floats:,} floats")
            axes.plot(ks, [r["ingest_mb_per_s"] for r in points], "-", marker="s", color=line.get_color(),
                      label=f"server ingest, {floats:,} floats")
        axes.set_xscale("log", base=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.ingest --sizes 1M 10M --workers 1 4 16")
    parser.add_argument("--sizes", nargs="+", type=parse_count, default=[10**6, 10**7], metavar="N",
                        help="float32 values per upload, e.g. 100k 1M 10M (default: 1M 10M)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 4, 16], metavar="K",
                        help="workers uploading at once, each its own process (default: 1 4 16)")
    parser.add_argument("--repeats", type=int, default=5, metavar="R",
                        help="timed rounds per (N, K), each followed by a floor repeat (default: 5)")
    parser.add_argument("--sample-stacks", type=float, default=0.0, metavar="SECONDS",
                        help="sample the server threads' stacks at this interval and keep the most frequent "
                             "frames in the JSON (default: 0, off: sampling takes the GIL too)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ingest.json"), metavar="PATH",
                        help="JSON result file (default: runs/bench/ingest.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.workers) < 1:
        parser.error("--repeats and every --workers count must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = run_info()
    results = measure(args.sizes, args.workers, args.repeats, args.sample_stacks)
    print(table(results))
    write_json(args.out, {"benchmark": "ingest", "target_ratio": TARGET_RATIO, **info,
                          "load_average_1m_after": os.getloadavg()[0], "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
