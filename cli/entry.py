"""The `lbgm` command's entry point. `lbgm health` runs without importing torch or the rest of
lbgm (container healthchecks start it every 30 s: docs in docker/README.md); every other command
goes through lbgm.cli.main."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["health"]:
        from lbgm.cli import health
        return health.main(args[1:])
    from lbgm.cli.main import main as run_command
    return run_command(args)
