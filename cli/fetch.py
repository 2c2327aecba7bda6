"""`lbgm fetch-data`: download a data set's official files into a data folder, once, before
the runs that read it. Servers and workers never download by themselves: many processes
fetching into one folder at once would race, and a read-only folder must stay untouched."""

from __future__ import annotations

import argparse
from pathlib import Path

from lbgm.cli.options import add_log_level


def add_parser(commands: argparse._SubParsersAction) -> None:
    from lbgm.tasks.datasets import DATASETS, EMBEDDED

    fetch = commands.add_parser("fetch-data", help="download a data set's official files into --data-dir",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fetch.add_argument("--dataset", required=True, choices=[name for name in DATASETS if name != EMBEDDED],
                       help="data set to fetch")
    fetch.add_argument("--data-dir", required=True, type=Path,
                       help="folder to fetch into (it gets the data set's usual subfolder; must be writable)")
    add_log_level(fetch)
    fetch.set_defaults(func=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    from lbgm.tasks.datasets import load_dataset

    for split in ("train", "test"):
        data = load_dataset(args.dataset, split, args.data_dir, download=True)
        print(f"{args.dataset} {split}: {len(data.labels)} images in {args.data_dir}")
    return 0
