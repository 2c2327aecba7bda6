"""`lbgm lab`: one federation across network namespaces with capped links, over real TCP.

Root only. The lab is one network namespace per host (the server and --hosts worker
hosts, each worker host one process of --workers-per-host virtual workers), joined
through a bridge in a switch namespace (cli/netns.py); each worker host's uplink is
capped with tbf. The federation is `lbgm run`'s (launcher.launch) with every process
started inside its host's namespace. The run folder gets lab.json next to
metrics.jsonl and summary.json: the links' kernel byte counters, the caps, the wall
time and the time to the target accuracy. Every namespace is deleted afterwards, also
on failure, Ctrl-C or SIGTERM, and `lbgm lab --cleanup` removes what a killed lab left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from lbgm.cli import netns
from lbgm.cli.launcher import Placement, WorkerProcess, launch, worker_groups
from lbgm.cli.options import UsageError, add_log_level
from lbgm.cli.report import add_target_argument, read_records, rounds_to_target
from lbgm.common.config import ExperimentConfig, add_config_arguments, config_from_args

DEFAULT_SUBNET = "10.77.0.0/24"


def add_parser(commands: argparse._SubParsersAction) -> None:
    lab = commands.add_parser(
        "lab", help="run a federation across network namespaces with capped links (root only)",
        description="Build one network namespace per host (a server and --hosts worker hosts) joined by veth "
                    "links through a bridge in a switch namespace, cap each worker host's uplink with tbf, run "
                    "the experiment across them over real TCP, write lab.json (per-link byte counters, caps, "
                    "time to the target accuracy) into the run folder, and remove every namespace afterwards. "
                    "Nothing is created in the host's own network namespace.")
    lab.add_argument("--hosts", type=int, default=4, help="worker hosts, one namespace each (default: 4)")
    lab.add_argument("--workers-per-host", type=int, default=0,
                     help="virtual workers per worker host; sets workers = hosts x this "
                          "(default: 0, spread --workers over the hosts)")
    lab.add_argument("--uplink", default="10mbit",
                     help="rate cap of each worker host's uplink, in tc units: 10mbit, 500kbit, 1gbit "
                          "(default: 10mbit)")
    lab.add_argument("--downlink", help="rate cap of each worker host's downlink, as --uplink (default: uncapped)")
    lab.add_argument("--subnet", default=DEFAULT_SUBNET,
                     help=f"private IPv4 subnet of the lab; the server takes its first address "
                          f"(default: {DEFAULT_SUBNET})")
    lab.add_argument("--out-dir", type=Path, default=Path("runs/lab"),
                     help="parent folder of run folders (default: runs/lab)")
    lab.add_argument("--cleanup", action="store_true",
                     help="only remove the namespaces of labs whose process has died, then exit")
    add_target_argument(lab)
    add_log_level(lab)
    add_config_arguments(lab)
    lab.set_defaults(func=cmd_lab)


def require_lab_tools() -> None:
    """A lab needs root and iproute2; say so in one line instead of failing halfway through the build."""
    if os.geteuid() != 0:
        raise UsageError("must run as root: a lab creates network namespaces, veth links and tc qdiscs (try sudo)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not found on PATH; a lab needs iproute2")


def parse_cap(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return netns.parse_rate(text)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def lab_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment, with workers = hosts x --workers-per-host when that is given."""
    config = config_from_args(args)
    if args.workers_per_host < 0:
        raise UsageError(f"--workers-per-host must be >= 1 (or 0 to spread --workers), got {args.workers_per_host}")
    if args.workers_per_host:
        workers = args.hosts * args.workers_per_host
        if args.workers is not None and args.workers != workers:
            raise UsageError(f"--workers {args.workers} contradicts --hosts {args.hosts} x --workers-per-host "
                             f"{args.workers_per_host} = {workers}")
        config = config.with_overrides({"workers": workers})
    if config.workers < args.hosts:
        raise UsageError(f"{config.workers} workers cannot fill {args.hosts} hosts; give --workers-per-host")
    return config


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
    except (OSError, UsageError):  # interrupted before the first round closed
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


def cmd_lab(args: argparse.Namespace) -> int:
    require_lab_tools()
    if args.cleanup:
        return cleanup_stale()
    if args.hosts < 1:
        raise UsageError(f"--hosts must be >= 1, got {args.hosts}")
    config = lab_config(args)
    uplink, downlink = parse_cap(args.uplink, "--uplink"), parse_cap(args.downlink, "--downlink")
    try:
        layout = netns.plan(netns.lab_prefix(os.getpid()), args.subnet, args.hosts)
    except ValueError as error:
        raise UsageError(f"--subnet {args.subnet}: {error}") from None
    return run_lab(config, layout, uplink, downlink, args.out_dir, args.target_accuracy, args.log_level,
                   args.log_format)
