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
