"""The TLS flags of `lbgm server`, `worker` and `status`, and the credentials
they load; files are read before anything starts, so a missing or mismatched
one stops the command with its name."""

from __future__ import annotations

import argparse
from pathlib import Path

from lbgm.cli.options import UsageError
from lbgm.common.tls import ChannelTls, ServerTls, channel_credentials, is_loopback, worker_cert_paths


def _check_pair(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together: give both or neither")


def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS", "required to listen on any address but loopback (docs/SECURITY.md)")
    group.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    group.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path,
                       help="CA bundle (PEM) that signed the workers' certificates: turns on mutual TLS, where "
                            "every caller must present one and a worker acts only under its certificate's "
                            "Common Name")
    group.add_argument("--allow-insecure", action="store_true",
                       help="serve plaintext on a non-loopback address anyway (logged as a warning)")


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The server's TLS credentials; None (plaintext) only on loopback or with --allow-insecure."""
    _check_pair(args.tls_cert, args.tls_key)
    if args.tls_cert is not None:
        return ServerTls.load(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.tls_client_ca is not None:
        raise UsageError("--tls-client-ca needs the server's own --tls-cert and --tls-key")
    if not is_loopback(args.host) and not args.allow_insecure:
        raise UsageError(f"--host {args.host} is reachable from other machines: give --tls-cert and --tls-key "
                         f"(and --tls-client-ca to authenticate workers), or --allow-insecure to serve plaintext")
    return None


def add_client_tls_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("TLS", "any of these turns TLS on; without them the channel is plaintext")
    group.add_argument("--tls-ca", type=Path,
                       help="CA bundle (PEM) that signed the server's certificate (default: the system's roots)")
    group.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for servers that require mutual TLS")
    group.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    group.add_argument("--tls-server-name", default="",
                       help="name to check the server's certificate against instead of the host in --server")
    return group


def client_tls(args: argparse.Namespace, cert: Path | None, key: Path | None) -> ChannelTls | None:
    """The channel security the TLS flags ask for, presenting `cert` if given; None for plaintext."""
    _check_pair(cert, key)
    if cert is None and args.tls_ca is None and not args.tls_server_name:
        return None
    return ChannelTls(channel_credentials(args.tls_ca, cert, key), args.tls_server_name)


def worker_tls(args: argparse.Namespace, names: list[str]) -> dict[str, ChannelTls] | None:
    """Each virtual worker's channel security: with mutual TLS each needs a certificate for its own name."""
    if args.tls_cert_dir is not None:
        if args.tls_cert is not None or args.tls_key is not None:
            raise UsageError("--tls-cert-dir and --tls-cert/--tls-key exclude each other")
        return {name: client_tls(args, *worker_cert_paths(args.tls_cert_dir, name)) for name in names}
    if args.tls_cert is not None and len(names) > 1:
        raise UsageError(f"--tls-cert certifies one worker name; give the {len(names)} virtual workers "
                         f"one certificate each with --tls-cert-dir")
    tls = client_tls(args, args.tls_cert, args.tls_key)
    return None if tls is None else dict.fromkeys(names, tls)
