"""The environment of lbgm processes: LBGM_<OPTION> variables stand in for command-line
options, so a launcher hands its children every setting as a flag and takes the LBGM_*
variables away; only the federation's own join token travels as a variable, since a flag
would show it to every local user in the process list."""

from __future__ import annotations

import os
import secrets

ENV_PREFIX = "LBGM_"


def secret_variable(name: str) -> str:
    """The environment variable that stands in for --NAME (in commands that read the environment)."""
    return ENV_PREFIX + name.replace("-", "_").upper()


def new_secret() -> str:
    """A fresh random token, for a federation that hands it to its own processes."""
    return secrets.token_urlsafe(24)


def environ_without_options() -> dict[str, str]:
    """This process's environment minus LBGM_* variables: for children that get every option as a flag."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
