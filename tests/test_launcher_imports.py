"""`lbgm run`'s launcher process never loads torch (nor numpy): it only starts the server and the
worker processes, shows the progress bar and prints the summary, and torch would cost it ~0.37 GB of
the federation's memory for the whole run (issue 18, item 1). Its checks that need torch run in a
child (launch/preflight.py) and must still stop a bad run with the same one line, exit status 2."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbgm.common.devices import local_device
from lbgm.experiment.config import FIELDS
from lbgm.task.loader import check_task
from lbgm.task import TaskOptions

from conftest import lbgm

HEAVY = ("torch", "numpy")
TINY_JOB = ("--workers", "2", "--processes", "1", "--rounds", "3", "--name", "tiny")


def loaded_heavy_modules(code: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs `code` in a fresh interpreter, then lists the modules of HEAVY it had imported (last stdout line)."""
    probe = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done, ast.literal_eval(done.stdout.splitlines()[-1])


def test_the_launcher_modules_import_without_torch():
    _, heavy = loaded_heavy_modules("import lbgm.cli.entry, lbgm.cli.main, lbgm.launch.federation, "
                                    "lbgm.launch.preflight")
    assert heavy == []


def test_lbgm_run_help_is_complete_without_torch():
    done, heavy = loaded_heavy_modules("from lbgm.cli.entry import main; main(['run', '--help'])")
    assert heavy == []
    for flag in ("--processes", "--out-dir", "--device", "--server-device", "--mirrors", "--log-level", "--config",
                 *(f"--{name.replace('_', '-')}" for name in FIELDS)):
        assert flag in done.stdout


def maps_hold(pid: int, library: str) -> bool | None:
    """Whether process `pid` has `library` mapped; None once it is gone."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_a_real_lbgm_run_launcher_never_maps_torch_while_its_children_do(tmp_path):
    launcher = subprocess.Popen(lbgm("run", *TINY_JOB, "--out-dir", str(tmp_path)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    launcher_maps_torch, launcher_maps_numpy, child_maps_torch, samples_with_children = False, False, False, 0
    while launcher.poll() is None:
        running = children(launcher.pid)
        launcher_maps_torch |= bool(maps_hold(launcher.pid, "libtorch"))
        launcher_maps_numpy |= bool(maps_hold(launcher.pid, "_multiarray_umath"))
        child_maps_torch |= any(maps_hold(child, "libtorch") for child in running)
        samples_with_children += bool(running)
        time.sleep(0.05)
    out, err = launcher.communicate()
    assert launcher.returncode == 0, err
    assert "LBGM run summary" in out and "rounds: 100%" in err.replace("|", "")
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["rounds_completed"] == 3
    assert samples_with_children > 10 and child_maps_torch  # the probe sees torch where it is loaded
    assert not launcher_maps_torch and not launcher_maps_numpy


@pytest.mark.parametrize("flags, expected", [
    (("--task", "no_such_package.tasks:job"),
     lambda: check_task("no_such_package.tasks:job", TaskOptions(), 0)),
    (("--server-device", "gpu7"), lambda: local_device("gpu7", "--server-device")),
], ids=["task", "device"])
def test_a_setting_only_torch_can_check_stops_the_run_with_the_same_one_line(flags, expected, tmp_path):
    with pytest.raises(ValueError) as raised:  # a TaskError, a DeviceError
        expected()
    done = subprocess.run(lbgm("run", *TINY_JOB, *flags, "--out-dir", str(tmp_path / "runs")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"lbgm run: error: {raised.value}"]
    assert not (tmp_path / "runs").exists()
