"""The checkpoint's files: only what the committed manifest names is trusted,
LBG files are named and checked by content, and a full disk leaves the
previous checkpoint intact with no temporary file and an error that says so."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lbgm.common import state_files
from lbgm.experiment.config import ExperimentConfig
from lbgm.common.lookback import LookbackGradient
from lbgm.server.checkpoint import CheckpointError, CheckpointStore, ServerState

from conftest import FAST, start_server, start_worker
from test_recovery import free_port, read_records

CONFIG = ExperimentConfig(name="files", workers=1, rounds=3, **FAST)


class Crash(Exception):
    """Stands in for SIGKILL at a crash point."""


def state(round_number: int, lbg: torch.Tensor, version: int) -> ServerState:
    return ServerState(completed_rounds=round_number, params=[torch.zeros(2)], buffers=[], velocity=None,
                       workers=[(1, "w", 0)], mirrors={1: {0: LookbackGradient((lbg,), version)}},
                       last_accepted={1: round_number}, metrics=[], totals={"uplink": 0, "downlink": 0},
                       elapsed_seconds=0.0)


def crash_at(monkeypatch, point: str) -> None:
    def crash_point(name: str) -> None:
        if name == point:
            raise Crash(name)
    monkeypatch.setattr(state_files, "crash_point", crash_point)


def test_a_redone_round_replaces_what_an_uncommitted_checkpoint_left_under_the_same_version(tmp_path, monkeypatch):
    CheckpointStore(tmp_path).save(state(1, torch.ones(3), version=1), CONFIG)
    crash_at(monkeypatch, "checkpoint.manifest.temp-written")
    with pytest.raises(Crash):  # round 2's LBG file is on disk, its manifest is not
        CheckpointStore(tmp_path).save(state(2, torch.full((3,), 2.0), version=2), CONFIG)
    monkeypatch.undo()

    resumed = CheckpointStore(tmp_path)  # a new server process
    assert resumed.load(CONFIG).completed_rounds == 1
    redone = torch.full((3,), 7.0)  # the redone round 2 sent something else under version 2
    resumed.save(state(2, redone, version=2), CONFIG)

    loaded = CheckpointStore(tmp_path).load(CONFIG)
    assert torch.equal(loaded.mirrors[1][0].tensors[0], redone) and loaded.mirrors[1][0].version == 2
    assert sorted(p.name for p in (tmp_path / "lbg").iterdir()) == [
        f"w1-u0-v2-{state_files.content_digest([redone])[:16]}.pt"]  # the uncommitted file was deleted
    assert not (tmp_path / "manifest.pt.tmp").exists()


def test_an_unchanged_entry_is_not_written_again(tmp_path):
    store = CheckpointStore(tmp_path)
    lbg = torch.ones(3)
    assert store.save(state(1, lbg, version=1), CONFIG) == 12
    assert store.save(state(2, lbg, version=1), CONFIG) == 0
    assert CheckpointStore(tmp_path).save(state(3, lbg, version=1), CONFIG) == 0  # trusted from the manifest


def test_loading_refuses_an_lbg_file_whose_content_differs_from_the_manifest(tmp_path):
    CheckpointStore(tmp_path).save(state(1, torch.ones(3), version=1), CONFIG)
    (path,) = (tmp_path / "lbg").iterdir()
    torch.save([torch.tensor([1.0, 1.0, 1.5])], path)
    with pytest.raises(CheckpointError, match=f"LBG file {path} is damaged: its tensors have SHA-256"):
        CheckpointStore(tmp_path).load(CONFIG)


class FullDisk:
    """A file on a disk with no space left: it is created, but no byte can be written to it."""

    def __init__(self, path: Path, mode: str) -> None:
        self._file = open(path, mode)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    CheckpointStore(tmp_path).save(state(1, torch.ones(3), version=1), CONFIG)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr(state_files, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as error:
        CheckpointStore(tmp_path).save(state(2, torch.full((3,), 2.0), version=2), CONFIG)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert "No space left on device" in str(error.value) and str(tmp_path / "lbg") in str(error.value)
    assert sorted(tmp_path.rglob("*")) == before
    assert CheckpointStore(tmp_path).load(CONFIG).completed_rounds == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 2.4 MB tmpfs (needs root): it holds round 1's checkpoint of the MLP (two LBGs and the model,
    636 KB each: 1.9 MB), not one more LBG."""
    mount = tmp_path / "runs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2400k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_server_whose_disk_fills_up_stops_with_the_path_and_resumes_once_there_is_space(
        tmp_path, small_disk, processes):
    config = ExperimentConfig(name="full", workers=2, rounds=3, delta=0.0, **FAST)
    port = free_port()
    server = start_server(tmp_path, config, port=port)
    processes.append(server.process)
    worker = start_worker(tmp_path, server.target, "w", virtual_workers=2, extra_args=["--give-up-after", "120"])
    processes.append(worker)
    assert server.process.wait(timeout=120) == 1, server.log()
    log = server.log()
    assert "cannot write the checkpoint after round 2: [Errno 28] No space left on device: " \
           f"'{server.run_dir / 'checkpoint' / 'lbg'}" in log
    assert "the checkpoint after round 1 is intact on disk" in log
    assert "Traceback" not in log and "enforce fail" not in log
    assert not list(small_disk.rglob("*.tmp"))
    assert CheckpointStore.of_run(server.run_dir).resumable_round(config) == 1

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = start_server(tmp_path, config, extra_args=["--resume"], port=port, log_name="resumed.log")
    processes.append(resumed.process)
    assert resumed.process.wait(timeout=120) == 0, resumed.log()
    assert worker.wait(timeout=60) == 0
    assert "resumed from" in resumed.log()
    assert [r["round"] for r in read_records(server.run_dir)] == [1, 2, 3]
