"""`lbgm run` stopped by SIGTERM (a scheduler, `timeout`, `kill`) stops its server and workers too,
like Ctrl-C; before, the launcher died at once and left them running (workers retrying for minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import lbgm


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_launcher_its_server_and_its_workers(tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    launcher = subprocess.Popen(lbgm("run", "--processes", "2", "--rounds", "500", "--out-dir", str(out_dir),
                                     "--name", "terminated"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        metrics = out_dir / "terminated" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # the federation is training
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline, "no round closed within 120 s"
            time.sleep(0.2)
        children = children_of(launcher.pid)
        assert len(children) == 3, f"expected a server and 2 worker processes, found {children}"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 130
        assert "interrupted; stopping all processes" in launcher.stderr.read()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in children), "the server or a worker outlived the launcher"
    finally:  # whatever failed, nothing of this run may outlive the test
        for pid in {launcher.pid, *children, *children_of(launcher.pid)}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
