"""The cost of one container healthcheck: `lbgm health` against a running server.

A container engine starts the image's HEALTHCHECK command every 30 s for as long as the server
runs, so its start-up cost is paid again and again. Measured side by side in one invocation,
against the same running `lbgm server`:

- `lbgm health` as the image runs it (lbgm.cli.entry: grpc and the TLS helpers only);
- the same check through the full command module (lbgm.cli.main, which imports torch and the
  rest of lbgm), as every `lbgm health` ran before the light entry point.

Each is run --repeats times as a child process; the CPU seconds (user + system, from the
children's resource usage) and wall seconds of each are recorded, and the medians and their
ratio printed (and written as JSON with --out).

    python -m bench.healthcheck --repeats 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lbgm.experiment.config import ExperimentConfig, config_to_toml

COMMANDS = {
    "lbgm health (light entry point)": "from lbgm.cli.entry import main; raise SystemExit(main())",
    "through lbgm.cli.main (before)": "from lbgm.cli.main import main; raise SystemExit(main())",
}


def timed(command: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process run to completion; it must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A server waiting for workers (it stays up, healthy, until stopped)."""
    config = folder / "config.toml"
    config.write_text(config_to_toml(ExperimentConfig(name="health", workers=2, rounds=1)))
    port_file = folder / "port"
    server = subprocess.Popen([sys.executable, "-m", "lbgm.cli", "server", "--config", str(config), "--port", "0",
                               "--port-file", str(port_file), "--out-dir", str(folder / "runs"),
                               "--log-level", "WARNING"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, f"127.0.0.1:{int(port_file.read_text())}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="checks per way (default: 10)")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server, target = start_server(Path(folder))
        try:
            samples = {name: [] for name in COMMANDS}
            for _ in range(args.repeats):  # interleaved, so both ways see the same machine load
                for name, code in COMMANDS.items():
                    samples[name].append(timed([sys.executable, "-c", code, "health", "--server", target]))
        finally:
            server.terminate()
            server.wait()
    results = {name: {"cpu_seconds_median": statistics.median(cpu for cpu, _ in runs),
                      "wall_seconds_median": statistics.median(wall for _, wall in runs), "runs": len(runs)}
               for name, runs in samples.items()}
    light, full = (results[name] for name in COMMANDS)
    results["cpu_ratio_before_over_light"] = full["cpu_seconds_median"] / light["cpu_seconds_median"]
    for name in COMMANDS:
        print(f"{name:34s} CPU {results[name]['cpu_seconds_median']:.3f} s, "
              f"wall {results[name]['wall_seconds_median']:.3f} s (median of {args.repeats})")
    print(f"before / light CPU: {results['cpu_ratio_before_over_light']:.1f}x")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
