"""The shared secrets of `lbgm server`, `worker` and `status`: the join token that
admits workers, and the operator token that unlocks the state digest
(docs/SECURITY.md). Each comes as --NAME, as LBGM_NAME (for commands that read
the environment) or from --NAME-file; a command line is visible to every local
user in the process list, so the variable or the file is the better place."""

from __future__ import annotations

import argparse
from pathlib import Path

from lbgm.cli.options import UsageError
from lbgm.launch.environment import secret_variable

MIN_SECRET_CHARACTERS = 16  # a guessable secret protects nothing


def add_secret_arguments(group: argparse._ArgumentGroup, name: str, what: str) -> None:
    """--NAME TOKEN and --NAME-file FILE for the secret `what`."""
    variable = secret_variable(name)
    group.add_argument(f"--{name}", metavar="TOKEN",
                       help=f"{what} (at least {MIN_SECRET_CHARACTERS} characters); other local users can read a "
                            f"command line, so prefer {variable} or --{name}-file")
    group.add_argument(f"--{name}-file", type=Path, metavar="FILE", help=f"read the {what} from FILE's first line")


def read_secret(args: argparse.Namespace, name: str) -> bytes | None:
    """The secret --NAME or --NAME-file gives, as bytes; None if neither is given."""
    dest = name.replace("-", "_")
    text, path = getattr(args, dest), getattr(args, f"{dest}_file")
    if text is not None and path is not None:
        raise UsageError(f"--{name} and --{name}-file exclude each other")
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --{name}-file {path}: {getattr(error, 'strerror', None) or error}") from None
        text = lines[0].strip() if lines else ""
    if text is None:
        return None
    if len(text) < MIN_SECRET_CHARACTERS:
        source = f"--{name}-file {path}" if path is not None else f"--{name}"
        raise UsageError(f"{source}: the token must be at least {MIN_SECRET_CHARACTERS} characters, got {len(text)}")
    return text.encode()
