"""Running the network lab: one federation across network namespaces with capped links, over real TCP.

The lab is one network namespace per host (the server and the worker hosts, each
worker host one process of its virtual workers), joined through a bridge in a switch
namespace (lab/netns.py); each worker host's uplink is capped with tbf. The federation
is `lbgm run`'s (lbgm.launch.federation.launch) with every process started inside its host's
namespace. The run folder gets lab.json next to metrics.jsonl and summary.json: the
links' kernel byte counters, the caps, the wall time and the time to the target
accuracy. Every namespace is deleted afterwards, also on failure, Ctrl-C or SIGTERM,
and `cleanup_stale` removes what a killed lab left. `lbgm lab` (cli/lab.py) parses the
flags and calls `run_lab`.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from lbgm.experiment.config import ExperimentConfig
from lbgm.lab import netns
from lbgm.launch.federation import Placement, WorkerProcess, launch, worker_groups
from lbgm.report.comparison import rounds_to_target
from lbgm.report.runs import ReportError, read_records


def time_to_target(records: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first round at or above `target`, with the server's clock at its end: `seconds` from the
    server's start (workers' start-up included), `training_seconds` from the start of round 1."""
    hit = rounds_to_target(records, target)
    if hit is None:
        return None
    reached = next(record for record in records if record["round"] == hit.round)
    round_one_started = records[0]["elapsed_seconds"] - records[0]["round_seconds"]
    return {"round": hit.round, "seconds": reached["elapsed_seconds"],
            "training_seconds": reached["elapsed_seconds"] - round_one_started, "uplink_bytes": hit.uplink_bytes}


def placement(layout: netns.Layout, groups: Sequence[int]) -> Placement:
    """The server and one worker process per host, each inside its namespace; the lab process itself
    stays in the root namespace and polls the server's status through a relay."""
    server = layout.server
    address = str(server.address.ip)
    workers = tuple(WorkerProcess(f"host{index}", count, netns.exec_prefix(host.namespace))
                    for index, (host, count) in enumerate(zip(layout.workers, groups), start=1))
    return Placement(workers, server_host=address, server_prefix=netns.exec_prefix(server.namespace),
                     server_args=("--allow-insecure",),  # plaintext: the lab subnet is reachable from nowhere else
                     status_route=partial(netns.Forwarder, server.namespace))


def lab_record(layout: netns.Layout, groups: Sequence[int], uplink: int | None, downlink: int | None,
               wall_seconds: float, run_dir: Path, target: float) -> dict[str, Any]:
    """What lab.json holds; read before the namespaces (and their counters) are deleted."""
    try:
        records = read_records(run_dir / "metrics.jsonl")
    except (OSError, ReportError):  # interrupted before the first round closed
        records = ()

    def host(name: str, entry: netns.Host, **extra: Any) -> dict[str, Any]:
        return {"name": name, "namespace": entry.namespace, "address": str(entry.address.ip),
                "interface": entry.interface, **extra, **netns.counters(entry.namespace, entry.interface)}

    return {
        "prefix": layout.prefix, "subnet": str(layout.server.address.network),
        "uplink_bits_per_second": uplink, "downlink_bits_per_second": downlink,
        "wall_seconds": wall_seconds, "rounds_completed": len(records),
        "target_accuracy": target, "time_to_target": time_to_target(records, target),
        "server": host("server", layout.server),
        "worker_hosts": [host(f"host{index}", entry, virtual_workers=count)
                         for index, (entry, count) in enumerate(zip(layout.workers, groups), start=1)],
    }


def format_lab(record: dict[str, Any], path: Path) -> str:
    mb = 1e6
    reached = record["time_to_target"]
    target = f"{record['target_accuracy']:g} accuracy"
    rows = [(f"to {target}", "not reached" if reached is None else
             f"round {reached['round']}, {reached['seconds']:.1f} s after the server started "
             f"({reached['training_seconds']:.1f} s from round 1)")]
    for entry in (record["server"], *record["worker_hosts"]):
        workers = f", {entry['virtual_workers']} workers" if "virtual_workers" in entry else ""
        rows.append((f"{entry['name']} {entry['address']}",
                     f"sent {entry['tx_bytes'] / mb:.2f} MB, received {entry['rx_bytes'] / mb:.2f} MB{workers}"))
    rows.append(("lab record", str(path)))
    width = max(len(name) for name, _ in rows)
    title = (f"LBGM lab {record['prefix']}: {record['subnet']}, "
             f"uplink {netns.format_rate(record['uplink_bits_per_second'])}, "
             f"downlink {netns.format_rate(record['downlink_bits_per_second'])} per worker host")
    return "\n".join(["", title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's path: stop the processes, then tear the lab down


def teardown(layout: netns.Layout) -> None:
    """Deletes the lab and checks that nothing with its prefix is left; signals wait until it is done,
    so a second Ctrl-C cannot strand half a lab."""
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        netns.remove(layout.namespaces)
        left = netns.leftovers(layout.prefix)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if left:
        raise netns.NetnsError(f"could not remove {', '.join(left)}; try `lbgm lab --cleanup`")


def run_lab(config: ExperimentConfig, layout: netns.Layout, uplink: int | None, downlink: int | None,
            out_dir: Path, target: float, log_level: str, log_format: str) -> int:
    groups = worker_groups(config.workers, len(layout.workers))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        netns.remove(netns.lab_namespaces(layout.prefix))  # left by a dead lab that had our process id
        netns.build(layout, uplink, downlink)
        print(f"lbgm lab: namespaces {', '.join(layout.namespaces)}; uplink {netns.format_rate(uplink)}, "
              f"downlink {netns.format_rate(downlink)} per worker host", file=sys.stderr)
        started = time.monotonic()
        status = launch(config, out_dir, placement(layout, groups), log_level, "lbgm lab", log_format)
        run_dir = out_dir / config.name
        record = lab_record(layout, groups, uplink, downlink, time.monotonic() - started, run_dir, target)
        path = run_dir / "lab.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        if status == 0:
            print(format_lab(record, path))
        return status
    except KeyboardInterrupt:
        print("lbgm lab: interrupted; removing the lab", file=sys.stderr)
        return 130
    finally:
        try:
            teardown(layout)
        finally:
            signal.signal(signal.SIGTERM, previous)


def cleanup_stale() -> int:
    stale = list(netns.stale_namespaces())
    netns.remove(stale)
    print(f"lbgm lab: removed {len(stale)} namespaces of dead labs{': ' if stale else ''}{', '.join(stale)}")
    return 0
