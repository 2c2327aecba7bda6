"""`lbgm lab`: a federation across network namespaces with capped uplinks, and nothing left behind.

The lab tests need root and working `ip netns` (CI runs as root); the others run anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, lbgm
from lbgm.cli.main import main
from lbgm.lab import netns
from lbgm.lab.experiment import time_to_target

MODEL_BYTES = (784 * 200 + 200 + 200 * 10 + 10) * 4  # the MLP as float32: one full upload carries at least this
UPLINK_BITS = 10_000_000
FAST_FLAGS = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]


def _netns_works() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    probe = f"{netns.lab_prefix(os.getpid())}-s"  # a lab name, so `lbgm lab --cleanup` finds it if we die here
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return True


needs_netns = pytest.mark.skipif(not _netns_works(), reason="needs root and a working `ip netns`")


def assert_nothing_left(prefix: str) -> None:
    """Checked with plain iproute2, not with the code under test."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"{prefix}-" not in namespaces
    assert f"{prefix}-" not in links


def lab_command(out_dir: Path, *extra: str) -> list[str]:
    return lbgm("lab", "--hosts", "3", "--uplink", "10mbit", "--out-dir", str(out_dir), "--name", "lab",
                *FAST_FLAGS, *extra)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ without root

def test_lab_refuses_to_start_without_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["lab", "--hosts", "2"]) == 2
    assert "must run as root" in capsys.readouterr().err


def test_plan_puts_the_server_first_and_fits_interface_names():
    layout = netns.plan(netns.lab_prefix(4_194_304), "10.77.0.0/24", 253)  # the largest pid, the fullest /24
    assert str(layout.server.address) == "10.77.0.1/24"
    assert [str(host.address.ip) for host in layout.workers[:2]] == ["10.77.0.2", "10.77.0.3"]
    names = [layout.bridge, *(name for host in layout.hosts for name in (host.interface, host.port))]
    assert max(map(len, names)) <= netns.MAX_IFNAME
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("subnet, hosts", [("10.77.0.0/30", 2), ("8.8.8.0/24", 1), ("fd00::/64", 1)])
def test_plan_refuses_public_small_or_ipv6_subnets(subnet, hosts):
    with pytest.raises(ValueError):
        netns.plan("lbgm1", subnet, hosts)


def test_rates_are_read_in_tc_bit_units():
    assert netns.parse_rate("10mbit") == 10_000_000
    assert netns.parse_rate("1.5Mbit") == 1_500_000
    assert netns.parse_rate("500kbit") == 500_000
    with pytest.raises(ValueError):
        netns.parse_rate("10mbps")  # tc would read megabytes: refused rather than guessed


def test_time_to_target_counts_from_the_server_start_and_from_round_one():
    records = [{"round": 1, "test_accuracy": 0.5, "uplink_bytes": 10, "downlink_bytes": 40, "elapsed_seconds": 12.0,
                "round_seconds": 2.0},
               {"round": 2, "test_accuracy": 0.9, "uplink_bytes": 5, "downlink_bytes": 40, "elapsed_seconds": 15.0,
                "round_seconds": 3.0}]
    assert time_to_target(records, 0.9) == {"round": 2, "seconds": 15.0, "training_seconds": 5.0,
                                            "uplink_bytes": 15}
    assert time_to_target(records, 0.95) is None


# ------------------------------------------------------------------ real labs (root)

@needs_netns
def test_lab_trains_over_capped_veth_links_and_removes_them(tmp_path):
    result = subprocess.run(lab_command(tmp_path, "--workers-per-host", "2", "--rounds", "3", "--delta", "0"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "lab"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["round"] for record in records] == [1, 2, 3]
    lab = json.loads((run_dir / "lab.json").read_text())
    assert lab["uplink_bits_per_second"] == UPLINK_BITS and len(lab["worker_hosts"]) == 3
    for host in lab["worker_hosts"]:  # delta = 0: every round each virtual worker uploads the whole model
        assert host["tx_bytes"] > 3 * host["virtual_workers"] * MODEL_BYTES
        assert host["rx_bytes"] > 3 * host["virtual_workers"] * MODEL_BYTES
    for record in records:  # a round cannot beat the cap: a host's uploads must squeeze through 10 Mbit/s
        seconds_at_cap = record["uplink_bytes"] / 3 * 8 / UPLINK_BITS
        assert record["round_seconds"] > 0.8 * seconds_at_cap
    assert_nothing_left(lab["prefix"])


@needs_netns
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_lab_stops_its_processes_and_removes_its_namespaces(tmp_path, signum):
    log = tmp_path / "lab.err"
    with open(log, "w") as stderr:  # SIGINT at its default even if pytest runs as a background job (ignored there)
        lab = subprocess.Popen(lab_command(tmp_path, "--rounds", "500"), stdout=subprocess.DEVNULL, stderr=stderr,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    prefix = netns.lab_prefix(lab.pid)
    try:
        deadline = time.monotonic() + 180
        while "server on" not in log.read_text():  # printed once every worker process is started
            assert lab.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        inside = [int(pid) for host in ("s", "w1", "w2", "w3")
                  for pid in subprocess.run(["ip", "netns", "pids", f"{prefix}-{host}"], capture_output=True,
                                            text=True, check=True).stdout.split()]
        assert len(inside) >= 4
        lab.send_signal(signum)
        assert lab.wait(timeout=60) == 130, log.read_text()
    finally:
        if lab.poll() is None:  # the test failed: do the lab's teardown for it
            lab.kill()
            lab.wait()
            netns.remove(netns.lab_namespaces(prefix))
    assert not [pid for pid in inside if running(pid)]
    assert_nothing_left(prefix)


@needs_netns
def test_cleanup_removes_the_namespaces_of_dead_labs_only(capsys):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead, alive = f"{netns.lab_prefix(finished.pid)}-w1", f"{netns.lab_prefix(os.getpid())}-w1"
    for name in (dead, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert main(["lab", "--cleanup"]) == 0
        assert dead in capsys.readouterr().out
        assert alive in netns.lab_namespaces() and dead not in netns.lab_namespaces()
    finally:
        netns.remove([dead, alive])
