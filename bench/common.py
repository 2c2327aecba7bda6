"""What every benchmark script needs: a server in its own process, a clock,
robust summaries, and the same table and JSON output.

Servers run in spawned processes (never forked: a fork would copy the
client's gRPC and torch state, and two processes are what we claim to measure).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from lbgm.launch.federation import terminate_as_interrupt

STARTUP_SECONDS = 60.0  # a spawned child imports torch and grpc before it can listen
STOP_SECONDS = 10.0
STOP = "stop"

ChildTarget = Callable[..., None]  # target(connection, *args): sends its port, then waits for STOP


@contextmanager
def child_server(target: ChildTarget, *args: Any) -> Iterator[int]:
    """Runs `target(connection, *args)` in a spawned process and yields the port it reports.

    The child must send its listening port over the connection, then serve until it
    receives STOP (or until its own work ends); on exit the child is stopped and reaped."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=target, args=(child_end, *args), daemon=True)
    process.start()
    child_end.close()
    try:
        if not parent_end.poll(STARTUP_SECONDS):
            raise RuntimeError(f"benchmark server {target.__qualname__} reported no port within {STARTUP_SECONDS}s "
                               f"(exit code {process.exitcode})")
        yield parent_end.recv()
    finally:
        with suppress(OSError):  # the child may already have ended by itself
            parent_end.send(STOP)
        process.join(STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
        parent_end.close()


def wait_for_stop(connection: Connection) -> None:
    """In a child: block until the parent says STOP or goes away."""
    with suppress(EOFError, OSError):
        connection.recv()


def timed(call: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, never an interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def parse_count(text: str) -> int:
    """'100k', '10M', '1G' or a plain integer, so sizes read like the issue states them."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    number = float(text[:-1] if scale > 1 else text)
    if number <= 0 or number * scale != int(number * scale):
        raise ValueError(f"expected a positive whole count like 100k, 10M or 1000, got {text!r}")
    return int(number * scale)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_info() -> dict[str, Any]:
    """Where and when a result was measured: numbers from a loaded 2-core box are not comparable to others."""
    return {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.orig_argv),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }


LEGEND_INSIDE_MAX = 4  # legend entries that fit inside a figure without hiding lines


@contextmanager
def chart(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[Any]:
    """Matplotlib axes for one benchmark figure, written to `path` (headless) with its legend on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    try:
        yield axes
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if len(axes.get_legend_handles_labels()[1]) > LEGEND_INSIDE_MAX:  # below the axes, off the lines
            axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
        else:
            axes.legend()
        figure.tight_layout()
        figure.savefig(path, bbox_inches="tight")
    finally:
        plt.close(figure)


def run_main(main: Callable[[], None]) -> None:
    """A benchmark's entry point: a failed run (a federation that exited, a server that never listened)
    ends with one line on stderr and exit status 1, not a traceback; SIGTERM stops it like Ctrl-C."""
    try:
        with terminate_as_interrupt():  # a killed benchmark stops the federations it started
            main()
    except (RuntimeError, OSError) as error:
        sys.exit(f"{Path(sys.argv[0]).stem}: {error}")


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
