"""What every subcommand shares: the user-error type and the logging option."""

from __future__ import annotations

import argparse
import logging
import sys


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2, no traceback."""


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default: INFO)")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def worker_names(prefix: str, count: int) -> list[str]:
    """The names of `count` virtual workers hosted under `prefix`: the prefix itself when alone."""
    return [prefix] if count == 1 else [f"{prefix}-{index}" for index in range(count)]
