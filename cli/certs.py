"""`lbgm certs`: a development CA, a server certificate and one client
certificate per worker name, for trying TLS and mutual TLS (docs/SECURITY.md).

The CA key is written next to the certificates, so this suits development and
tests; a real deployment issues its certificates from its own CA.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lbgm.cli.options import UsageError, add_log_level, worker_names
from lbgm.common.tls import Identity, issue_client, issue_server, make_ca, worker_cert_paths

CA_COMMON_NAME = "lbgm development CA"


def add_parser(commands: argparse._SubParsersAction) -> None:
    certs = commands.add_parser(
        "certs", help="create a development CA, server certificate and per-worker client certificates",
        description="Write ca.crt/ca.key, server.crt/server.key and, for every worker name X, X.crt/X.key "
                    "(Common Name X, '/' in file names written as '_') into --out; private keys get mode 0600. "
                    "Workers then run with --tls-ca OUT/ca.crt --tls-cert-dir OUT.")
    certs.add_argument("--out", type=Path, required=True, help="folder to write to (created if missing)")
    names = certs.add_mutually_exclusive_group(required=True)
    names.add_argument("--workers", nargs="+", metavar="NAME", help="worker names, as given to `lbgm worker --name`")
    names.add_argument("--worker-prefix", metavar="P",
                       help="with --count N: the names of `lbgm worker --name P --virtual-workers N` "
                            "(P-0 ... P-<N-1>, or P alone when N is 1)")
    certs.add_argument("--count", type=int, help="number of virtual workers under --worker-prefix")
    certs.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"], metavar="HOST",
                       help="host names and IP addresses the server certificate is valid for "
                            "(default: localhost 127.0.0.1)")
    certs.add_argument("--days", type=int, default=30, help="validity of every certificate in days (default: 30)")
    add_log_level(certs)
    certs.set_defaults(func=cmd_certs)


def requested_names(args: argparse.Namespace) -> list[str]:
    if args.worker_prefix is None:
        if args.count is not None:
            raise UsageError("--count goes with --worker-prefix")
        return list(dict.fromkeys(args.workers))
    if args.count is None or args.count < 1:
        raise UsageError(f"--worker-prefix needs --count >= 1, got {args.count}")
    return worker_names(args.worker_prefix, args.count)


def cmd_certs(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise UsageError(f"--days must be >= 1, got {args.days}")
    names = requested_names(args)
    try:  # everything is made before anything is written, so a bad name leaves no half-made folder
        ca = make_ca(CA_COMMON_NAME, args.days)
        issued: list[tuple[str, Path, Path, Identity]] = [
            ("CA (keep ca.key off worker hosts)", args.out / "ca.crt", args.out / "ca.key", ca),
            (f"server ({', '.join(args.hosts)})", args.out / "server.crt", args.out / "server.key",
             issue_server(ca, args.hosts, args.days)),
            *((f"worker {name}", *worker_cert_paths(args.out, name), issue_client(ca, name, args.days))
              for name in names),
        ]
    except ValueError as error:
        raise UsageError(str(error)) from None
    owners: dict[Path, str] = {}
    for what, cert_path, _, _ in issued:
        if cert_path in owners:
            raise UsageError(f"{what} and {owners[cert_path]} would both be written to {cert_path}")
        owners[cert_path] = what
    args.out.mkdir(parents=True, exist_ok=True)
    for what, cert_path, key_path, identity in issued:
        identity.save(cert_path, key_path)
        print(f"wrote {cert_path} and {key_path}: {what}")
    return 0
