"""The grid of a sweep: its axes (the [sweep] table of a base config file: each key a list
of values), every combination of their values as a checked ExperimentConfig, and the run
names, which are folder names, so a sweep started again finds its runs."""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

from lbgm.experiment.config import FIELDS, ConfigError, ExperimentConfig


class SweepError(ValueError):
    """A grid that cannot run: one line naming the key, value or file, before any run starts."""


def axis_problem(key: str) -> str | None:
    """Why the setting `key` cannot be an axis of a sweep, or None when it can."""
    if key == "name":
        return "'name' cannot be swept; each run is named after its grid point"
    if key not in FIELDS:
        return f"unknown setting {key!r}; known settings: {', '.join(FIELDS)}"
    return None


def read_sweep_table(path: Path) -> dict[str, list[Any]]:
    """The [sweep] table of a base config file (empty when it has none)."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SweepError(f"cannot read {path}: {error}") from None
    table = document.get("sweep", {})
    source = f"[sweep] in {path}"
    if "sweep" in document and "experiment" not in document:
        raise SweepError(f"{path}: a file with a [sweep] table keeps its base settings under [experiment]")
    if not isinstance(table, dict):
        raise SweepError(f"{source} must be a table of setting = [values], got {table!r}")
    for key, values in table.items():
        if (problem := axis_problem(key)) is not None:
            raise SweepError(f"{source}: {problem}")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{source}: {key} must be a non-empty list (e.g. delta = [0.0, 0.2]), got {values!r}")
    return table


def expand_grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def format_value(value: Any) -> str:
    """A value as it appears in a run name: stable and safe in a file name (0.0 -> '0', 0.5 -> '0.5')."""
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value).removesuffix(".0") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def run_name(base: str, point: dict[str, Any]) -> str:
    return "-".join([base, *(f"{key}{format_value(value)}" for key, value in point.items())])


def grid_configs(base: ExperimentConfig, axes: dict[str, list[Any]]) -> list[ExperimentConfig]:
    """One validated config per grid point, all checked before any run starts."""
    configs = []
    for point in expand_grid(axes):
        try:
            config = base.with_overrides(point)
        except ConfigError as error:
            label = ", ".join(f"{key}={value!r}" for key, value in point.items())
            raise SweepError(f"grid point {label}: {error}") from None
        typed = {key: getattr(config, key) for key in point}  # 1 and 1.0 name the same run
        configs.append(dataclasses.replace(config, name=run_name(base.name, typed)))
    names = [config.name for config in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SweepError(f"the grid names runs more than once ({', '.join(repeated)}); give each value once")
    return configs
