"""Deployment files, checked without Docker or Kubernetes: the Dockerfile, docker/compose.yaml
and docker/k8s/ may only use commands, options and LBGM_* variables that the real `lbgm`
parsers accept. Plus `lbgm health` against a real server, and the variables' precedence."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lbgm.cli.main import build_parser, main
from lbgm.cli.options import ENV_PREFIX, env_options
from lbgm.experiment.config import ExperimentConfig, config_from_args, config_to_toml, load_config
from lbgm.launch.environment import environ_without_options

from conftest import FAST, start_server

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
ROLES = ("server", "worker")


@pytest.fixture(autouse=True)
def no_lbgm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from an environment without LBGM_* variables, whatever the shell holds."""
    for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def variables(role: str) -> set[str]:
    """The LBGM_* names `lbgm <role>` reads, derived from its parser."""
    return set(env_options(subcommand(role)))


def parse(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> argparse.Namespace:
    """argv as the real `lbgm` parser reads it with `env` set (a bad value fails the test via SystemExit)."""
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------ Dockerfile

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in (DOCKER / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def instruction(name: str) -> str:
    """The last `name` instruction's arguments (the one that takes effect)."""
    return [arguments for keyword, arguments in dockerfile() if keyword == name][-1]


def image_env() -> dict[str, str]:
    return dict(item.split("=", 1) for keyword, arguments in dockerfile() if keyword == "ENV"
                for item in shlex.split(arguments))


def test_image_runs_as_a_non_root_user():
    user = instruction("USER").split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000


def test_image_env_defaults_are_option_variables():
    lbgm_variables = {key for key in image_env() if key.startswith(ENV_PREFIX)}
    assert lbgm_variables and lbgm_variables <= variables("server") | variables("worker")


def test_image_entrypoint_and_cmd_start_a_server_listening_for_other_containers(monkeypatch):
    assert json.loads(instruction("ENTRYPOINT")) == ["lbgm"]
    args = parse(json.loads(instruction("CMD")), monkeypatch, image_env())
    assert (args.command, args.host, args.port, args.out_dir) == ("server", "0.0.0.0", 50051, Path("/runs"))


def test_image_healthcheck_asks_the_grpc_health_service_on_the_exposed_port(monkeypatch):
    options, command = instruction("HEALTHCHECK").split(" CMD ", 1)
    args = parse(json.loads(command)[1:], monkeypatch)
    assert json.loads(command)[0] == "lbgm" and args.command == "health"
    assert args.server.rsplit(":", 1)[1] in instruction("EXPOSE").split()


def run_requirements(*names: str) -> list[str]:
    result = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "--pyproject",
                             str(ROOT / "pyproject.toml"), *names], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_image_installs_exactly_the_pyproject_dependencies_with_the_same_torch_pins():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert run_requirements() == dependencies
    torch = run_requirements("torch", "torchvision")
    assert torch == [line for line in dependencies if re.match(r"torch(vision)?==", line)] and len(torch) == 2
    install = " ".join(arguments for keyword, arguments in dockerfile() if keyword == "RUN")
    assert "requirements.py torch torchvision > torch.txt" in install
    assert '--index-url "$TORCH_INDEX_URL" -r torch.txt' in install and "-r requirements.txt" in install
    assert "download.pytorch.org/whl/cpu" in instruction("ARG")


def test_image_copies_every_package_folder_of_pyproject():
    """`pip install .` in the image needs every folder pyproject.toml maps a package to (lbgm imports them all)."""
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = [Path(arguments.split()[0]) for keyword, arguments in dockerfile() if keyword == "COPY"]
    missing = [folder for folder in sorted(folders)
               if not any(Path(folder).is_relative_to(source) for source in copied)]
    assert missing == []


def test_dependency_layer_depends_only_on_pyproject():
    steps = dockerfile()
    copies = [arguments.split() for keyword, arguments in steps if keyword == "COPY"]
    assert copies[0] == ["pyproject.toml", "docker/requirements.py", "./"]
    first_install = next(index for index, (keyword, arguments) in enumerate(steps)
                         if keyword == "RUN" and "requirements.txt" in arguments)
    assert [arguments for keyword, arguments in steps[:first_install] if keyword == "COPY"] == [" ".join(copies[0])]


# ------------------------------------------------------------------ compose.yaml

def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolated(value: object) -> str:
    """A compose value with ${VAR:-default} replaced by its default, as when nothing is set."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


@pytest.mark.parametrize("role", ROLES)
def test_compose_variables_are_options_of_their_role_and_its_command_parses(role, monkeypatch):
    service = compose()["services"][role]
    environment = {key: interpolated(value) for key, value in service["environment"].items()}
    assert set(environment) <= variables(role)
    args = parse(service["command"], monkeypatch, {**image_env(), **environment})
    assert args.command == role


def test_compose_has_one_healthchecked_server_and_scalable_workers_that_wait_for_it(monkeypatch):
    services = compose()["services"]
    assert set(services) == {"server", "worker"}
    server, worker = services["server"], services["worker"]
    assert "container_name" not in worker and "hostname" not in worker  # --scale needs distinct containers
    assert "LBGM_NAME" not in worker["environment"]  # the name is the container's host name
    test = server["healthcheck"]["test"]
    args = parse(test[2:], monkeypatch)
    assert test[:2] == ["CMD", "lbgm"] and args.command == "health" and args.server.endswith(":50051")
    assert "127.0.0.1:50051:50051" in map(interpolated, server["ports"])  # the host's loopback only
    assert worker["healthcheck"] == {"disable": True}
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    # A restarted server must continue the run, not start it afresh over its checkpoint.
    assert server["restart"] == "on-failure" and server["environment"]["LBGM_AUTO_RESUME"] == "1"


def test_compose_mounts_data_read_only_and_keeps_runs_and_worker_state_in_volumes():
    document = compose()
    mounts = {role: {interpolated(volume).split(":")[1]: volume for volume in service["volumes"]}
              for role, service in document["services"].items()}
    assert all(mounts[role]["/data"].endswith(":ro") for role in ROLES)
    assert mounts["server"]["/runs"] == "runs:/runs" and mounts["worker"]["/state"] == "worker-state:/state"
    assert mounts["server"]["/etc/lbgm/experiment.toml"].endswith(":ro")
    assert document["services"]["server"]["environment"]["LBGM_CONFIG"] == "/etc/lbgm/experiment.toml"
    assert set(document["volumes"]) == {"runs", "worker-state"}


# ------------------------------------------------------------------ Kubernetes

def manifests() -> dict[tuple[str, str], dict]:
    """(kind, name) -> document, over every YAML file in docker/k8s."""
    return {(document["kind"], document.get("metadata", {}).get("name", "")): document
            for path in sorted(K8S.glob("*.yaml")) for document in yaml.safe_load_all(path.read_text())}


def container(kind: str, name: str) -> dict:
    (only,) = manifests()[kind, name]["spec"]["template"]["spec"]["containers"]
    return only


def plain_env(spec: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in spec.get("env", []) if "value" in item}


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def test_k8s_has_every_object_and_no_namespace():
    documents = manifests()
    for key in [("Deployment", "lbgm-server"), ("Service", "lbgm-server"), ("StatefulSet", "lbgm-worker"),
                ("Service", "lbgm-worker"), ("ConfigMap", "lbgm-experiment"), ("Secret", "lbgm-server-tls"),
                ("Secret", "lbgm-worker-tls"), ("PersistentVolumeClaim", "lbgm-runs")]:
        assert key in documents
    assert all("namespace" not in document.get("metadata", {}) for document in documents.values())


def test_k8s_server_is_one_recreated_replica_serving_grpc_and_metrics(monkeypatch):
    deployment = manifests()["Deployment", "lbgm-server"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    spec = container("Deployment", "lbgm-server")
    assert set(plain_env(spec)) <= variables("server")
    args = parse(spec["args"], monkeypatch, {**image_env(), **plain_env(spec)})
    assert args.command == "server" and args.metrics_port == 9100 and args.tls_client_ca is not None
    service_ports = {port["name"]: port["port"] for port in manifests()["Service", "lbgm-server"]["spec"]["ports"]}
    container_ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    assert service_ports == container_ports == {"grpc": args.port, "metrics": args.metrics_port}


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_k8s_server_probes_ask_the_grpc_health_service_on_the_service_port(probe, monkeypatch):
    spec = container("Deployment", "lbgm-server")
    command = spec[probe]["exec"]["command"]
    args = parse(command[1:], monkeypatch)
    assert command[0] == "lbgm" and args.command == "health"
    grpc_port = next(port["port"] for port in manifests()["Service", "lbgm-server"]["spec"]["ports"]
                     if port["name"] == "grpc")
    assert args.server == f"127.0.0.1:{grpc_port}"
    assert args.tls_cert is not None and args.tls_server_name == "lbgm-server"  # mutual TLS, so no native grpc probe


def test_k8s_workers_are_a_statefulset_named_after_their_pods(monkeypatch):
    statefulset = manifests()["StatefulSet", "lbgm-worker"]["spec"]
    assert manifests()["Service", "lbgm-worker"]["spec"]["clusterIP"] == "None"
    assert statefulset["serviceName"] == "lbgm-worker"
    spec = container("StatefulSet", "lbgm-worker")
    names = {item["name"]: item for item in spec["env"]}
    assert names["LBGM_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert set(names) <= variables("worker")
    args = parse(spec["args"], monkeypatch, {**image_env(), **plain_env(spec), "LBGM_NAME": "lbgm-worker-0"})
    assert args.command == "worker" and args.server == "lbgm-server:50051" and args.virtual_workers == 1
    assert args.name == "lbgm-worker-0" and args.state_dir == Path("/state")
    assert "/state" in {mount["mountPath"] for mount in spec["volumeMounts"]}


def test_k8s_config_map_holds_a_valid_experiment_for_as_many_workers_as_pods(tmp_path):
    path = tmp_path / "experiment.toml"
    path.write_text(manifests()["ConfigMap", "lbgm-experiment"]["data"]["experiment.toml"])
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.workers == manifests()["StatefulSet", "lbgm-worker"]["spec"]["replicas"]


def test_k8s_secrets_hold_every_file_the_server_and_workers_read(monkeypatch):
    server_args = parse(container("Deployment", "lbgm-server")["args"], monkeypatch)
    probe_args = parse(container("Deployment", "lbgm-server")["livenessProbe"]["exec"]["command"][1:], monkeypatch)
    server_files = {path.name for path in (server_args.tls_cert, server_args.tls_key, server_args.tls_client_ca,
                                           probe_args.tls_cert, probe_args.tls_key, probe_args.tls_ca)}
    assert server_files == set(manifests()["Secret", "lbgm-server-tls"]["stringData"])
    replicas = manifests()["StatefulSet", "lbgm-worker"]["spec"]["replicas"]
    worker_files = {"ca.crt"} | {f"lbgm-worker-{index}.{ext}" for index in range(replicas) for ext in ("crt", "key")}
    assert worker_files == set(manifests()["Secret", "lbgm-worker-tls"]["stringData"])
    assert "server.key" not in worker_files


KUBERNETES_VERSION = "1.31.0"  # the oldest release still supported upstream when these manifests were written


@pytest.mark.parametrize("key", sorted(key for key in manifests() if key[0] != "Kustomization"),
                         ids=lambda key: "/".join(key))
def test_k8s_manifests_are_valid_objects_of_the_kubernetes_api(key):
    """Strict validation against the API's own OpenAPI schema: a misspelt or misplaced field fails."""
    kubernetes_validate.validate(manifests()[key], KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind, name", [("Deployment", "lbgm-server"), ("StatefulSet", "lbgm-worker")])
def test_k8s_pods_run_as_the_image_user_who_can_read_the_mounted_keys(kind, name):
    pod = manifests()[kind, name]["spec"]["template"]["spec"]
    user = int(instruction("USER").split(":")[0])
    context = pod["securityContext"]
    assert context["runAsNonRoot"] and context["runAsUser"] == context["runAsGroup"] == user
    assert context["fsGroup"] == user  # volumes, the secrets' 0440 key files included, belong to its group
    secrets = [volume["secret"] for volume in pod["volumes"] if "secret" in volume]
    assert secrets and all(secret["defaultMode"] & 0o040 for secret in secrets)


def mounted(spec: dict, path: Path) -> bool:
    return any(path.is_relative_to(mount["mountPath"]) for mount in spec["volumeMounts"])


def test_k8s_volumes_sit_where_the_image_and_the_arguments_expect_them(monkeypatch):
    server = container("Deployment", "lbgm-server")
    server_args = parse(server["args"], monkeypatch, {**image_env(), **plain_env(server)})
    server_files = [server_args.config, server_args.tls_cert, server_args.tls_key, server_args.tls_client_ca]
    probe = parse(server["livenessProbe"]["exec"]["command"][1:], monkeypatch)
    server_files += [Path(probe.tls_ca), Path(probe.tls_cert), Path(probe.tls_key)]
    assert all(mounted(server, Path(path)) for path in server_files)
    assert mounted(server, server_args.out_dir) and str(server_args.out_dir) == image_env()["LBGM_OUT_DIR"]
    worker = container("StatefulSet", "lbgm-worker")
    worker_args = parse(worker["args"], monkeypatch, {**image_env(), **plain_env(worker), "LBGM_NAME": "lbgm-worker-0"})
    assert mounted(worker, Path(worker_args.tls_ca)) and mounted(worker, Path(worker_args.tls_cert_dir))
    assert mounted(worker, worker_args.state_dir) and str(worker_args.state_dir) == image_env()["LBGM_STATE_DIR"]
    claims = [template["metadata"]["name"] for template in manifests()["StatefulSet", "lbgm-worker"]["spec"]["volumeClaimTemplates"]]
    assert next(mount["name"] for mount in worker["volumeMounts"] if mount["mountPath"] == "/state") in claims


# ------------------------------------------------------------------ lbgm health

def test_health_is_serving_while_the_server_waits_for_workers(tmp_path, processes, capsys):
    server = start_server(tmp_path, ExperimentConfig(name="health", workers=2, rounds=1, **FAST))
    processes.append(server.process)
    assert main(["health", "--server", server.target]) == 0
    assert main(["health", "--server", server.target, "--service", "lbgm.v1.Aggregator"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{server.target} (server): SERVING",
                                                    f"{server.target} (lbgm.v1.Aggregator): SERVING"]
    assert main(["health", "--server", server.target, "--service", "no.such.Service"]) == 1
    assert "unhealthy: NOT_FOUND" in capsys.readouterr().out


def test_the_lbgm_entry_point_runs_health_without_importing_torch():
    """Container healthchecks start `lbgm health` every 30 s: it must not pay for importing torch."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import sys; from lbgm.cli.entry import main; status = main(['health', '--server', '127.0.0.1:%d', "
            "'--timeout', '2']); print(sorted(m for m in ('torch', 'lbgm.cli.main') if m in sys.modules)); "
            "sys.exit(status)" % port)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "unhealthy: UNAVAILABLE" in done.stdout and done.stdout.splitlines()[-1] == "[]"
    bad = subprocess.run([sys.executable, "-m", "lbgm.cli", "health", "--server", "127.0.0.1:1", "--tls-cert", "x.crt"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "lbgm health: error: --tls-cert and --tls-key go together: give both or neither"]


def test_health_fails_against_a_closed_port(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["health", "--server", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert "unhealthy: UNAVAILABLE" in line


# ------------------------------------------------------------------ LBGM_* variables

def test_every_server_and_worker_option_has_a_variable():
    for role in ROLES:
        options = [action for action in subcommand(role)._actions if action.dest != "help"]
        assert len(variables(role)) == len(options)
    assert {"LBGM_ROUNDS", "LBGM_DELTA", "LBGM_CONFIG", "LBGM_TLS_CERT", "LBGM_RESUME"} <= variables("server")
    assert {"LBGM_SERVER", "LBGM_VIRTUAL_WORKERS", "LBGM_TLS_CERT_DIR"} <= variables("worker")


def test_flag_beats_variable_beats_config_file_beats_default(tmp_path, monkeypatch):
    path = tmp_path / "exp.toml"
    path.write_text(config_to_toml(ExperimentConfig(rounds=5, delta=0.3, error_feedback=True)))

    def config(*argv: str, **env: str) -> ExperimentConfig:
        return config_from_args(parse(["server", *argv], monkeypatch, env))

    assert config().rounds == 200
    assert config("--config", str(path)).rounds == 5
    assert config("--config", str(path), LBGM_ROUNDS="7").rounds == 7
    assert config("--config", str(path), "--rounds", "9", LBGM_ROUNDS="7").rounds == 9
    assert config(LBGM_CONFIG=str(path)).delta == 0.3
    assert config(LBGM_CONFIG=str(path), LBGM_ERROR_FEEDBACK="no").error_feedback is False
    assert config("--error-feedback", LBGM_CONFIG=str(path), LBGM_ERROR_FEEDBACK="0").error_feedback is True


def test_variables_set_plain_options_switches_and_required_ones(monkeypatch):
    args = parse(["server"], monkeypatch, {"LBGM_PORT": "6000", "LBGM_RESUME": "yes", "LBGM_TLS_CERT": "/c.pem"})
    assert (args.port, args.resume, args.tls_cert) == (6000, True, Path("/c.pem"))
    assert parse(["server"], monkeypatch, {"LBGM_PORT": ""}).port == 50051  # empty = unset
    args = parse(["worker"], monkeypatch, {"LBGM_SERVER": "h:1", "LBGM_RESUME": "nonsense"})  # not a worker option
    assert args.server == "h:1"
    assert parse(["worker", "--server", "other:2"], monkeypatch).server == "other:2"


@pytest.mark.parametrize("name, value, expected", [
    ("LBGM_ROUNDS", "ten", "LBGM_ROUNDS='ten' (for --rounds): expected int"),
    ("LBGM_RESUME", "maybe", "LBGM_RESUME='maybe' (for --resume): expected one of true, yes, on, 1"),
    ("LBGM_LOG_LEVEL", "LOUD", "LBGM_LOG_LEVEL='LOUD' (for --log-level): expected one of DEBUG"),
])
def test_a_bad_variable_is_one_line_naming_it(name, value, expected, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(["server"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lbgm server: error: " + expected)


def test_variables_of_server_and_worker_do_not_touch_other_commands(monkeypatch):
    args = parse(["status", "--server", "h:1"], monkeypatch, {"LBGM_ROUNDS": "ten", "LBGM_TLS_CERT": "/c.pem"})
    assert args.tls_cert is None
    assert "LBGM_ROUNDS" in subcommand("server").format_help()


def test_lbgm_run_children_get_no_lbgm_variables(monkeypatch):
    monkeypatch.setenv("LBGM_RESUME", "1")
    environ = environ_without_options()
    assert "LBGM_RESUME" not in environ and environ["PATH"] == os.environ["PATH"]
