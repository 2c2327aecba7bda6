"""Print the runtime dependencies of pyproject.toml, one requirement a line (pip -r format).

The image installs from this output, so pyproject.toml stays the only place that pins
versions; `requirements.py torch torchvision` prints just those two (installed first,
from the CPU wheel index). Standard library only: it runs before anything is installed.

    python requirements.py [--pyproject PATH] [NAME ...]
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9._-]+")


def canonical(name: str) -> str:
    """PEP 503 normalized name: Grpcio_Tools and grpcio-tools are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def dependencies(pyproject: Path, names: list[str]) -> list[str]:
    """[project].dependencies in file order, or the requirements of `names` in their order."""
    document = tomllib.loads(pyproject.read_text())
    by_name = {canonical(NAME.match(line).group()): line for line in document["project"]["dependencies"]}
    wanted = [canonical(name) for name in names] or list(by_name)
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise SystemExit(f"requirements.py: not a dependency in {pyproject}: {', '.join(missing)}")
    return [by_name[name] for name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"),
                        help="the project file (default: ./pyproject.toml)")
    parser.add_argument("names", nargs="*", metavar="NAME", help="print only these distributions' requirements")
    args = parser.parse_args()
    print("\n".join(dependencies(args.pyproject, args.names)))


if __name__ == "__main__":
    main()
