"""`lbgm lab`: the flags of the network lab and the call; the lab itself is lbgm.lab (lab/).

Root only: one network namespace per host (the server and --hosts worker hosts, each
worker host one process of --workers-per-host virtual workers) with capped links;
`lbgm lab --cleanup` removes what a killed lab left.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from lbgm.cli.options import UsageError, add_log_level
from lbgm.cli.report import add_target_argument
from lbgm.experiment.config import ExperimentConfig, add_config_arguments, config_from_args
from lbgm.lab import netns
from lbgm.lab.experiment import cleanup_stale, run_lab
from lbgm.task.loader import check_task

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


def cmd_lab(args: argparse.Namespace) -> int:
    require_lab_tools()
    if args.cleanup:
        return cleanup_stale()
    if args.hosts < 1:
        raise UsageError(f"--hosts must be >= 1, got {args.hosts}")
    config = lab_config(args)
    check_task(config.task, config.task_options, config.seed)  # before any namespace or process
    uplink, downlink = parse_cap(args.uplink, "--uplink"), parse_cap(args.downlink, "--downlink")
    try:
        layout = netns.plan(netns.lab_prefix(os.getpid()), args.subnet, args.hosts)
    except ValueError as error:
        raise UsageError(f"--subnet {args.subnet}: {error}") from None
    return run_lab(config, layout, uplink, downlink, args.out_dir, args.target_accuracy, args.log_level,
                   args.log_format)
