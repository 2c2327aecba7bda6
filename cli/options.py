"""What every subcommand shares: the user-error type, the logging option, and options
read from LBGM_<OPTION> environment variables (for containers and orchestrators)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lbgm.cli.logs import LOG_FORMATS, formatter
from lbgm.launch.environment import ENV_PREFIX


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2, no traceback."""


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """--log-level and --log-format: every command logs the same way (configure_logging)."""
    parser.add_argument("--log-level", default=default, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help=f"logging verbosity (default: {default})")
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                        help="log lines as text, or as one JSON object per line with ts (ISO 8601, UTC), level, "
                             "logger, thread, message and exception (default: text)")


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
    logging.captureWarnings(log_format == "json")  # Python warnings become records, so every line parses


def worker_names(prefix: str, count: int) -> list[str]:
    """The names of `count` virtual workers hosted under `prefix`: the prefix itself when alone."""
    return [prefix] if count == 1 else [f"{prefix}-{index}" for index in range(count)]


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
ENV_HELP = (f"Every option can also be set as an environment variable {ENV_PREFIX}<OPTION>: --rounds as "
            f"{ENV_PREFIX}ROUNDS, --tls-cert as {ENV_PREFIX}TLS_CERT, --config as {ENV_PREFIX}CONFIG; switches take "
            f"{'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}, and an empty variable counts as unset. "
            f"Precedence: command-line flag > environment variable > --config file > default.")


def env_name(action: argparse.Action) -> str | None:
    """The variable that stands in for a long option (--tls-cert: LBGM_TLS_CERT); None for --help,
    which holds no value (its default is SUPPRESS)."""
    flags = [flag for flag in action.option_strings if flag.startswith("--")]
    if not flags or action.default == argparse.SUPPRESS:
        return None
    return ENV_PREFIX + flags[0][2:].replace("-", "_").upper()


def env_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every variable `parser` reads, with the option it sets."""
    return {name: action for action in parser._actions if (name := env_name(action)) is not None}


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
    return word in TRUE_WORDS


def env_value(action: argparse.Action, text: str) -> Any:
    """The value `text` gives the option, converted and checked as argparse checks the flag's argument."""
    if action.nargs == 0:  # a switch: --resume, or --error-feedback/--no-error-feedback
        on = parse_bool(text)
        return on if isinstance(action, argparse.BooleanOptionalAction) else action.const if on else action.default
    try:
        value = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None
    except (TypeError, ValueError):
        raise ValueError(f"expected {getattr(action.type, '__name__', 'a valid value')}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return value


class EnvParser(argparse.ArgumentParser):
    """A subcommand parser that, with read_env, takes its options from LBGM_<OPTION> variables too.

    A variable's value is where parsing starts, so a flag still wins; experiment settings default to None
    ("not given", see config_from_args), so a variable still overrides the --config file. Variables are
    read when this subcommand is the one parsed: a bad LBGM_ROUNDS stops `lbgm server`, not `lbgm status`.
    """

    def __init__(self, *args: Any, read_env: bool = False, **kwargs: Any) -> None:
        if read_env:
            kwargs.setdefault("epilog", ENV_HELP)
        super().__init__(*args, **kwargs)
        self.read_env = read_env
        self._required: set[str] | None = None  # dests required on the command line, before variables

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self.read_env:
            values = self.env_values(os.environ)
            if self._required is None:
                self._required = {action.dest for action in self._actions if action.required}
            for action in self._actions:  # a variable satisfies a required option (LBGM_SERVER for --server)
                action.required = action.dest in self._required and action.dest not in values
            namespace = argparse.Namespace(**{**values, **vars(namespace or argparse.Namespace())})
        return super().parse_known_args(args, namespace)

    def env_values(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """dest -> value of every option whose variable is set and not empty; exits (status 2) on a bad one."""
        values = {}
        for name, action in env_options(self).items():
            text = environ.get(name, "")
            if not text:
                continue
            try:
                values[action.dest] = env_value(action, text)
            except ValueError as error:
                self.exit(2, f"{self.prog}: error: {name}={text!r} (for {action.option_strings[0]}): {error}\n")
        return values
