"""`lbgm run`'s checks that need torch, in a short-lived child process, so the launcher never loads it.

The launcher only starts processes, shows the progress bar and prints the summary: with python, grpc
and tqdm it holds ~30 MB, where importing torch would cost it ~0.37 GB for the whole run. But a bad
--device, weights file or task must still stop the run with one line and exit status 2 before any
process starts or anything is written. So the launcher hands the config and the devices to
`python -m lbgm.launch.preflight`, which checks them as the server and the workers will (the devices
exist, the weights file reads, the task loads and builds its model), prints the first problem's
message on stdout and exits 2; the launcher raises it as a PreflightError with that very message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lbgm.experiment.config import ExperimentConfig

CHECK_FAILED = 2  # the child's exit status when a setting is wrong (anything else non-zero: the child crashed)


class PreflightError(ValueError):
    """A device, weights file or task the checking child refused; its message is the child's."""


def check_in_child(config: ExperimentConfig, devices: Sequence[tuple[str, str]]) -> None:
    """Raise PreflightError unless every (device name, flag) in `devices` exists on this machine, the
    config's weights file (if any) reads, and its task loads and builds its model; a RuntimeError if
    the child itself failed."""
    request = json.dumps({"config": dataclasses.asdict(config), "devices": list(devices)})
    child = subprocess.run([sys.executable, "-m", "lbgm.launch.preflight"], input=request, stdout=subprocess.PIPE,
                           text=True, check=False)
    if child.returncode == CHECK_FAILED:
        raise PreflightError(child.stdout.strip())
    if child.returncode != 0:
        raise RuntimeError(f"the check of the devices and the task exited with status {child.returncode}")


def check(config: ExperimentConfig, devices: Sequence[tuple[str, str]]) -> None:
    """The checks themselves (in the child): DeviceError, WeightsError or TaskError on the first problem."""
    from lbgm.common.devices import local_device
    from lbgm.common.weights import read_weights
    from lbgm.task.loader import check_task

    for name, flag in devices:
        local_device(name, flag)
    if config.weights:
        read_weights(Path(config.weights))
    check_task(config.task, config.task_options, config.seed)


def main() -> int:
    from lbgm.common.devices import DeviceError
    from lbgm.common.errors import TaskError
    from lbgm.common.weights import WeightsError

    request = json.load(sys.stdin)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the message alone, whatever the task prints
            check(ExperimentConfig(**request["config"]), [(name, flag) for name, flag in request["devices"]])
    except (DeviceError, WeightsError, TaskError) as error:
        print(error)
        return CHECK_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
