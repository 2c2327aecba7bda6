"""Transport security: a server reachable from the network speaks TLS, and with
mutual TLS a caller acts only as the worker its client certificate names.
Real server processes over localhost; refusals are probed with raw gRPC calls."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from lbgm.experiment.config import ExperimentConfig
from lbgm.common.grpc_options import WORKER_ID_KEY, worker_metadata
from lbgm.common.tls import ChannelTls, channel_credentials, is_loopback, open_channel, worker_cert_paths
from lbgm.common.wire import update_parts
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.client import error_detail

from conftest import FAST, ServerProcess, join_request, lbgm, start_server, start_worker

CONFIG = ExperimentConfig(name="mtls", workers=2, rounds=2, **FAST)
# The probed server must outlive every probe: its one round waits for uploads that never come.
PROBED = ExperimentConfig(name="probed", workers=2, rounds=1, **{**FAST, "round_timeout": 600.0})


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(lbgm(*args), capture_output=True, text=True, timeout=120)


def make_certs(out: Path, *args: str) -> Path:
    result = run("certs", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    return out


def mutual_tls_args(certs: Path) -> list[str]:
    return ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
            "--tls-client-ca", str(certs / "ca.crt")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Certificates for alice and bob; the server's is valid for 'localhost' only, not for 127.0.0.1."""
    return make_certs(tmp_path_factory.mktemp("pki"), "--workers", "alice", "bob", "--hosts", "localhost")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki) -> ServerProcess:
    server = start_server(tmp_path_factory.mktemp("server"), PROBED, mutual_tls_args(pki))
    yield server
    server.process.kill()
    server.process.wait()


def dial(server: ServerProcess, ca: Path, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    """A TLS channel trusting `ca` and presenting the (certificate, key) pair `client`, if given."""
    credentials = channel_credentials(ca, *client) if client else channel_credentials(ca)
    return open_channel(server.target, ChannelTls(credentials, server_name="localhost"))


def as_worker(server: ServerProcess, pki: Path, name: str) -> grpc.Channel:
    return dial(server, pki / "ca.crt", worker_cert_paths(pki, name))


def join(channel: grpc.Channel, name: str) -> pb.JoinReply:
    stub = pb_grpc.AggregatorStub(channel)
    return stub.Join(join_request(stub, name), timeout=10)


def assert_unauthenticated(refused: pytest.ExceptionInfo, message: str) -> None:
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_detail(refused.value).reason == pb.ErrorDetail.UNAUTHENTICATED
    assert message in refused.value.details()


# ------------------------------------------------------------------ lbgm certs

def test_certs_name_each_worker_and_keep_keys_private(pki):
    for name in ("alice", "bob"):
        cert_path, key_path = worker_cert_paths(pki, name)
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert key_path.stat().st_mode & 0o777 == 0o600
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (pki / "server.key").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ a whole federation

def test_federation_over_mutual_tls_completes(tmp_path, processes):
    certs = make_certs(tmp_path / "certs", "--worker-prefix", "site", "--count", "2")
    server = start_server(tmp_path, CONFIG, mutual_tls_args(certs))
    processes.append(server.process)
    # One process, two virtual workers, each presenting the certificate of its own name.
    worker = start_worker(tmp_path, server.target, "site", virtual_workers=2,
                          extra_args=["--tls-ca", str(certs / "ca.crt"), "--tls-cert-dir", str(certs)])
    processes.append(worker)
    assert server.process.wait(timeout=180) == 0, server.log()
    assert worker.wait(timeout=60) == 0, (tmp_path / "site.log").read_text()
    assert json.loads((server.run_dir / "summary.json").read_text())["rounds_completed"] == CONFIG.rounds
    assert "transport: mutual TLS" in server.log()


# ------------------------------------------------------------------ the handshake

def test_client_certificate_from_another_ca_is_refused(server, pki, tmp_path):
    stranger = make_certs(tmp_path, "--workers", "alice")
    with dial(server, pki / "ca.crt", worker_cert_paths(stranger, "alice")) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            join(channel, "alice")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(server, pki):
    with dial(server, pki / "ca.crt") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            join(channel, "alice")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(server):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            join(channel, "alice")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ the worker name

def test_worker_joins_only_under_its_certificate_name(server, pki):
    with as_worker(server, pki, "alice") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            join(channel, "bob")
        assert_unauthenticated(refused, "certificate is for 'alice', not for worker 'bob'")
        assert join(channel, "alice").worker_id > 0


def test_worker_cannot_act_with_another_workers_token(server, pki):
    with as_worker(server, pki, "alice") as alice, as_worker(server, pki, "bob") as bob:
        join(alice, "alice")
        stolen = join(bob, "bob")
        poll = pb.TaskRequest(worker_id=stolen.worker_id, token=stolen.token, max_wait_seconds=0)
        as_bob = worker_metadata(stolen.worker_id, stolen.token)
        # Bob's own id and token are good: bob polls fine.
        list(pb_grpc.AggregatorStub(bob).GetTask(poll, timeout=10, metadata=as_bob))

        stub = pb_grpc.AggregatorStub(alice)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.GetTask(poll, timeout=10, metadata=as_bob))
        assert_unauthenticated(refused, "certificate is for 'alice', not for worker 'bob'")
        header = pb.UpdateHeader(worker_id=stolen.worker_id, token=stolen.token, round=1, num_samples=1)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitUpdate(update_parts(header, [], []), timeout=10, metadata=as_bob)
        assert_unauthenticated(refused, "certificate is for 'alice', not for worker 'bob'")


def test_call_without_token_is_unauthenticated(server, pki):
    with as_worker(server, pki, "alice") as channel:
        reply = join(channel, "alice")
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.AggregatorStub(channel).GetTask(pb.TaskRequest(worker_id=reply.worker_id), timeout=10,
                                                         metadata=((WORKER_ID_KEY, str(reply.worker_id)),)))
    assert_unauthenticated(refused, "needs the call metadata lbgm-worker-id")


# ------------------------------------------------------------------ the command line

def test_status_checks_the_server_certificate_name(server, pki):
    client = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "alice.crt"), "--tls-key", str(pki / "alice.key")]
    # The server's certificate names 'localhost', not the 127.0.0.1 the target says.
    mismatched = run("status", "--server", server.target, *client)
    assert mismatched.returncode == 2 and "cannot reach" in mismatched.stderr
    shown = run("status", "--server", server.target, *client, "--tls-server-name", "localhost", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["total_rounds"] == PROBED.rounds


def test_plaintext_on_a_network_address_needs_allow_insecure(tmp_path, processes):
    refused = run("server", "--host", "0.0.0.0", "--port", "0", "--out-dir", str(tmp_path))
    assert refused.returncode == 2
    assert "--allow-insecure" in refused.stderr and "Traceback" not in refused.stderr
    (tmp_path / "join-token").write_text("a-join-token-of-some-length\n")
    server = start_server(tmp_path, ExperimentConfig(name="open", workers=1, rounds=1, **FAST),
                          ["--host", "0.0.0.0", "--allow-insecure", "--join-token-file", str(tmp_path / "join-token")])
    processes.append(server.process)
    assert "WARNING" in server.log() and "WITHOUT TLS" in server.log()


@pytest.mark.parametrize("transport", [["--allow-insecure"], ["--tls-cert", "{pki}/server.crt", "--tls-key",
                                                                 "{pki}/server.key"]], ids=["plaintext", "tls"])
def test_a_network_address_needs_mutual_tls_or_a_join_token(tmp_path, pki, transport):
    refused = run("server", "--host", "0.0.0.0", "--port", "0", "--out-dir", str(tmp_path),
                  *(arg.format(pki=pki) for arg in transport))
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == ("lbgm server: error: --host 0.0.0.0 is reachable from other machines, and nothing "
                              "tells the workers from anyone else: give a join token (--join-token-file or "
                              "LBGM_JOIN_TOKEN, and the same to every worker) or mutual TLS (--tls-client-ca) "
                              "(docs/SECURITY.md)\n")
    assert not (tmp_path / "default").exists()  # refused before anything was written


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.5", False), ("example.org", False),
])
def test_only_loopback_addresses_count_as_local(host, loopback):
    assert is_loopback(host) == loopback


@pytest.mark.parametrize("args, message", [
    (["server", "--tls-cert", "/nonexistent/server.crt", "--tls-key", "/nonexistent/server.key"],
     "/nonexistent/server.crt"),
    (["server", "--tls-cert", "{pki}/alice.crt", "--tls-key", "{pki}/bob.key"], "does not belong to the certificate"),
    (["server", "--tls-client-ca", "{pki}/ca.crt"], "needs the server's own --tls-cert"),
    (["server", "--tls-cert", "{pki}/server.crt"], "--tls-cert and --tls-key go together"),
    (["worker", "--server", "127.0.0.1:1", "--name", "carol", "--tls-ca", "{pki}/ca.crt", "--tls-cert-dir", "{pki}"],
     "{pki}/carol.crt"),
    (["worker", "--server", "127.0.0.1:1", "--virtual-workers", "2", "--tls-cert", "{pki}/alice.crt",
      "--tls-key", "{pki}/alice.key"], "--tls-cert-dir"),
    (["status", "--server", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.crt"], "/nonexistent/ca.crt"),
])
def test_tls_mistakes_give_one_line_errors_naming_the_file(pki, args, message):
    result = run(*(arg.format(pki=pki) for arg in args))
    assert result.returncode == 2
    assert message.format(pki=pki) in result.stderr
    assert "Traceback" not in result.stderr
