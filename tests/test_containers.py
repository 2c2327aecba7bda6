"""A federation between real containers (podman): the server from the lbgm image and a weights file
alone, two worker containers from a user's image built on top of it (docker/worker-example), mutual
TLS with certificates from `lbgm certs`, the server's health check turning healthy, LBGM sending
scalars, the server container killed mid-run and started again with --resume, the workers
re-joining by themselves, and the results read from the mounted run folder.

Runs when LBGM_CONTAINER_IMAGE names a built lbgm image: `.ci/run` builds it with
docker/build-local.sh first; elsewhere the test is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import assert_mirrors_equal_worker_lbgs, lbgm

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("LBGM_CONTAINER_IMAGE", "")
USER_ID = "10001"  # the image's user, who must read the keys and write the run and state folders
ROUNDS = 12
KILL_AFTER_ROUND = 4
WORKER_HOSTS = ("wa", "wb")  # two worker containers with two virtual workers each
TASK_LAYERS = 6  # docker/worker-example/task.py: the small CNN's weight and bias tensors (LBGM units)
WORKER_NAMES = [f"{host}-{index}" for host in WORKER_HOSTS for index in range(2)]

pytestmark = pytest.mark.skipif(
    not IMAGE or shutil.which("podman") is None,
    reason="container test: set LBGM_CONTAINER_IMAGE to an image built by docker/build-local.sh (.ci/run does)")


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def wait_for(condition, timeout: float, what: str, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll)


def rounds_recorded(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if json.loads(line).get("round", 0) > 0)


def container_state(name: str) -> str:
    return podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()


class Containers:
    """Names of this test's containers, network and images (unique per run), removed at the end."""

    def __init__(self, tag: str) -> None:
        self.network = f"lbgm-ci-{tag}"
        self.server = f"lbgm-server-{tag}"
        self.workers = [f"lbgm-{host}-{tag}" for host in WORKER_HOSTS]
        self.worker_image = f"localhost/lbgm-worker-example:ci-{tag}"

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.server, *self.workers, check=False)
        podman("network", "rm", "--force", self.network, check=False)
        podman("rmi", "--force", self.worker_image, check=False)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{podman('logs', name, check=False).stderr[-4000:]}"
                         for name in [self.server, *self.workers])


@pytest.fixture
def containers():
    made = Containers(f"{os.getpid()}-{int(time.time())}")
    podman("network", "create", made.network)
    yield made
    made.remove()


def owned_by_image_user(*folders: Path) -> None:
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", f"{USER_ID}:{USER_ID}", str(folder)], check=True)


def test_container_federation_with_mutual_tls_and_a_server_restart(tmp_path, containers):
    certs, weights, runs, state = (tmp_path / name for name in ("certs", "weights", "runs", "state"))
    started = time.monotonic()

    # The user's worker image: lbgm's image plus the task, as docker/README.md shows.
    podman("build", "--quiet", "--build-arg", f"LBGM_IMAGE={IMAGE}", "-t", containers.worker_image,
           "-f", str(ROOT / "docker/worker-example/Dockerfile"), str(ROOT / "docker/worker-example"))
    assert podman("run", "--rm", "--no-healthcheck", "--entrypoint", "python", IMAGE, "-c", "import os; print(os.path.exists('/opt/task'))",
                  ).stdout.strip() == "False", "the server image must not carry the user's code"

    # Certificates for the server's container name, every virtual worker and the health check.
    subprocess.run([*lbgm("certs", "--out", str(certs), "--workers", *WORKER_NAMES, "healthcheck",
                          "--hosts", containers.server)], check=True, capture_output=True)
    owned_by_image_user(certs, weights, runs, state)

    # The initial model from the user's image: the server gets this file and nothing else of the user.
    podman("run", "--rm", "--no-healthcheck", "-v", f"{weights}:/weights", containers.worker_image,
           "init-weights", "--task", "/opt/task/task.py:task", "--out", "/weights/init.safetensors")

    tls_health = (f"lbgm health --server 127.0.0.1:50051 --timeout 5 --tls-ca /certs/ca.crt "
                  f"--tls-server-name {containers.server} --tls-cert /certs/healthcheck.crt "
                  f"--tls-key /certs/healthcheck.key")

    def start_server(*extra: str) -> None:
        podman("run", "-d", "--name", containers.server, "--network", containers.network,
               "-v", f"{runs}:/runs", "-v", f"{certs}:/certs:ro", "-v", f"{weights}:/weights:ro",
               "-e", "LBGM_WEIGHTS=/weights/init.safetensors", "-e", "LBGM_WORKERS=4",
               "-e", f"LBGM_ROUNDS={ROUNDS}", "-e", "LBGM_DELTA=0.2", "-e", "LBGM_LOCAL_LR=0.1",
               "-e", "LBGM_LOCAL_STEPS=2", "-e", "LBGM_ROUND_TIMEOUT=120",
               "-e", "LBGM_TLS_CERT=/certs/server.crt", "-e", "LBGM_TLS_KEY=/certs/server.key",
               "-e", "LBGM_TLS_CLIENT_CA=/certs/ca.crt",
               "--health-cmd", tls_health, "--health-interval", "30s", "--health-start-period", "60s",
               IMAGE, "server", "--name", "ci", *extra)

    def healthy() -> bool:
        podman("healthcheck", "run", containers.server, check=False)
        return podman("inspect", "--format", "{{.State.Health.Status}}", containers.server).stdout.strip() == "healthy"

    try:
        start_server()
        wait_for(healthy, 60, "the server's health check to pass")
        for host, name in zip(WORKER_HOSTS, containers.workers):
            podman("run", "-d", "--name", name, "--network", containers.network, "--no-healthcheck",
                   "-v", f"{certs}:/certs:ro", "-v", f"{state}:/state",
                   "-e", f"LBGM_SERVER={containers.server}:50051", "-e", f"LBGM_NAME={host}",
                   "-e", "LBGM_VIRTUAL_WORKERS=2", "-e", "LBGM_TLS_CA=/certs/ca.crt",
                   "-e", "LBGM_TLS_CERT_DIR=/certs", "-e", "LBGM_GIVE_UP_AFTER=120",
                   containers.worker_image)

        run_dir = runs / "ci"
        wait_for(lambda: rounds_recorded(run_dir) >= KILL_AFTER_ROUND, 240, f"round {KILL_AFTER_ROUND}")
        podman("kill", containers.server)
        podman("rm", containers.server)
        killed_after = rounds_recorded(run_dir)
        assert killed_after < ROUNDS, "the run ended before the server could be killed"
        assert all(container_state(name) == "running" for name in containers.workers), \
            "workers must wait for the server, not exit"

        start_server("--resume")
        wait_for(healthy, 60, "the resumed server's health check to pass")
        exit_code = podman("wait", containers.server, timeout=300).stdout.strip()
        assert exit_code == "0", containers.logs()
        for name in containers.workers:  # the server tells them the run is over
            assert podman("wait", name, timeout=60).stdout.strip() == "0", containers.logs()
    except BaseException:
        print(containers.logs())
        raise

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS
    assert summary["scalar_units"] > 0, "LBGM sent no scalar over the containers' network"
    assert summary["final_accuracy"] > 0.5, summary
    assert summary["final_accuracy_source"] == "federated"  # the server has no data: the workers evaluated
    server_logs = podman("logs", containers.server, check=False).stderr
    assert "resum" in server_logs.lower(), server_logs[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained_after_restart = {worker for row in rows if row.get("round", 0) > killed_after
                             for worker in row["participants"]}
    assert len(trained_after_restart) == len(WORKER_NAMES), "every worker came back after the restart"
    assert_mirrors_equal_worker_lbgs(run_dir, state, WORKER_NAMES, units=TASK_LAYERS)
    print(f"container federation: {time.monotonic() - started:.0f} s, killed after round {killed_after}, "
          f"final federated accuracy {summary['final_accuracy']:.4f}, {summary['scalar_units']} scalar units")
