"""Transport security: development certificates, and TLS credentials for the
server and for worker channels.

With mutual TLS every worker presents a client certificate whose subject
Common Name is its worker name, signed by the CA the server was given; the
server checks that name against the one each call acts as.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lbgm.common.grpc_options import CHANNEL_OPTIONS

LOOPBACK_NAMES = frozenset({"localhost"})
MAX_COMMON_NAME = 64  # X.520 upper bound; longer worker names cannot be certified
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates are valid a little before they were made


class TlsFileError(OSError):
    """A certificate or key file is missing, unreadable, or not what it should be."""


# ------------------------------------------------------------------ making development certificates

@dataclass(frozen=True)
class Identity:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def save(self, cert_path: Path, key_path: Path) -> None:
        """Write both as PEM; the key is readable by its owner only (mode 0600)."""
        cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
            file.write(key_pem)


def _name(common_name: str) -> x509.Name:
    if not 1 <= len(common_name) <= MAX_COMMON_NAME:
        raise ValueError(f"a certificate's Common Name must be 1-{MAX_COMMON_NAME} characters, "
                         f"got {len(common_name)}: {common_name!r}")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def make_ca(common_name: str, days: int) -> Identity:
    """A self-signed CA that can sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    certificate = (_builder(name, name, key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    return Identity(certificate, key)


def _issue(ca: Identity, common_name: str, days: int, usage: x509.ObjectIdentifier,
           hosts: Sequence[str] = ()) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(_name(common_name), ca.certificate.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=False, crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_host_name(host) for host in hosts]),
                                        critical=False)
    return Identity(builder.sign(ca.key, hashes.SHA256()), key)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server(ca: Identity, hosts: Sequence[str], days: int) -> Identity:
    """A server certificate valid for every host name and IP address in `hosts`."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    return _issue(ca, hosts[0], days, ExtendedKeyUsageOID.SERVER_AUTH, hosts)


def issue_client(ca: Identity, worker_name: str, days: int) -> Identity:
    """A worker's client certificate: its Common Name is the worker name the server will accept from it."""
    return _issue(ca, worker_name, days, ExtendedKeyUsageOID.CLIENT_AUTH)


def worker_cert_paths(directory: Path, worker_name: str) -> tuple[Path, Path]:
    """Where the certificate and key of `worker_name` live in a certificate folder."""
    stem = worker_name.replace("/", "_")
    return directory / f"{stem}.crt", directory / f"{stem}.key"


# ------------------------------------------------------------------ loading credentials

def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TlsFileError(f"cannot read the {what} {path}: {error.strerror}") from None


def _read_certificates(path: Path, what: str) -> bytes:
    data = _read(path, what)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(f"the {what} {path} holds no PEM certificate") from None
    return data


def _read_key_pair(cert_path: Path, key_path: Path, whose: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM), checked to belong together."""
    cert_pem = _read_certificates(cert_path, f"{whose} certificate")
    key_pem = _read(key_path, f"{whose} key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsFileError(f"the {whose} key {key_path} is not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    certified = x509.load_pem_x509_certificate(cert_pem).public_key()
    if key.public_key().public_bytes(*spki) != certified.public_bytes(*spki):
        raise TlsFileError(f"the {whose} key {key_path} does not belong to the certificate {cert_path}")
    return key_pem, cert_pem


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with `client_ca`, clients must present a certificate it signed."""
    pair = _read_key_pair(cert, key, "server")
    roots = _read_certificates(client_ca, "client CA bundle") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(ca: Path | None = None, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS verifying the server against `ca` (the system roots without it), presenting `cert` if given."""
    if (cert is None) != (key is None):
        raise ValueError(f"a client certificate needs its key and the other way round (cert {cert}, key {key})")
    roots = _read_certificates(ca, "CA bundle") if ca is not None else None
    key_pem, cert_pem = _read_key_pair(cert, key, "client") if cert is not None else (None, None)
    return grpc.ssl_channel_credentials(roots, key_pem, cert_pem)


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS credentials; `mutual` means every caller proved a worker name by certificate."""

    credentials: grpc.ServerCredentials
    mutual: bool

    @classmethod
    def load(cls, cert: Path, key: Path, client_ca: Path | None = None) -> ServerTls:
        return cls(server_credentials(cert, key, client_ca), mutual=client_ca is not None)


@dataclass(frozen=True)
class ChannelTls:
    """A client's TLS credentials; `server_name`, if set, is checked against the server's certificate
    instead of the host in the target address."""

    credentials: grpc.ChannelCredentials
    server_name: str = ""


def open_channel(target: str, tls: ChannelTls | None,
                 options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> grpc.Channel:
    """A channel to `target`: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    override = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, tls.credentials, options=[*options, *override])


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server unreachable from other machines."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
