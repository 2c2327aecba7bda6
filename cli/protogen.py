"""Regenerate the Python gRPC stubs from proto/lbgm/v1/lbgm.proto.

Usage: python -m lbgm.cli.protogen [--out DIR]

The stubs are committed so an install needs no code generation; the test
suite regenerates them into a temporary folder and fails on any difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

import lbgm.v1

PROTO_FILE = "lbgm/v1/lbgm.proto"


def proto_root() -> Path:
    """Folder that holds `lbgm/v1/lbgm.proto` (the repo's proto/ in a checkout)."""
    return Path(lbgm.v1.__file__).resolve().parents[2]


def generate(out_dir: Path) -> None:
    """Write lbgm_pb2.py, lbgm_pb2.pyi and lbgm_pb2_grpc.py below out_dir/lbgm/v1."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root()}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_root() / PROTO_FILE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=proto_root(),
                        help="output root (default: next to the .proto, i.e. in place)")
    args = parser.parse_args(argv)
    generate(args.out)
    print(f"generated stubs for {PROTO_FILE} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
