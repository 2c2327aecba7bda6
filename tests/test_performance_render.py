"""docs/PERFORMANCE.md is rebuilt from the results at hand without losing what was measured elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSPORT = "1. Transport: FullGradient upload vs a raw TCP socket"
INGEST = "7. Server ingest: K workers uploading at once vs grpcio's floor"


def render(results_dir: Path, document: Path) -> None:
    subprocess.run([sys.executable, "-m", "bench.performance", "--render", "--results-dir", str(results_dir),
                    "--out", str(document)], cwd=ROOT, check=True, capture_output=True, timeout=120)


def write_document(path: Path) -> None:
    path.write_text(
        "# Performance\n\nold header\n\n## Summary\n\n"
        f"- **{TRANSPORT.split(':')[0]}** (transport): measured on the old machine.\n"
        f"- **{INGEST.split(':')[0]}** (ingest): an old verdict.\n\n"
        "## Beyond one server\n\nWritten by hand.\n\n"
        f"## {TRANSPORT}\n\n| old | table |\n\nCommand: `python -m bench.transport` (started 2026-11-28).\n\n"
        f"## {INGEST}\n\nan old ingest table\n")


def ingest_results(results_dir: Path) -> None:
    row = {"floats": 1000, "workers": 1, "payload_bytes": 4000, "repeats": 1, "ingest_mb_per_s": 80.0,
           "floor_mb_per_s": 100.0, "ratio": 0.8, "meets_target": True, "ingest_server_cpu_s_per_gb": 1.0,
           "floor_server_cpu_s_per_gb": 1.0}
    (results_dir / "ingest.json").write_text(json.dumps({
        "command": "python -m bench.ingest --sizes 1k", "started_utc": "2026-12-03T00:00:00+00:00",
        "load_average_1m": 0.5, "cpu_count": 2, "results": [row]}))


def test_render_keeps_sections_it_has_no_results_for_and_rewrites_the_others(tmp_path: Path) -> None:
    document, results_dir = tmp_path / "PERFORMANCE.md", tmp_path / "results"
    results_dir.mkdir()
    write_document(document)
    ingest_results(results_dir)

    render(results_dir, document)
    text = document.read_text()

    assert "| old | table |" in text and "(started 2026-11-28)" in text  # transport: no results here, kept
    assert "measured on the old machine." in text
    assert "## Beyond one server\n\nWritten by hand.\n" in text  # prose no benchmark writes
    assert "an old ingest table" not in text and "an old verdict" not in text  # ingest: rewritten
    assert "python -m bench.ingest --sizes 1k" in text and "Target met." in text
    assert "old header" not in text
    assert text.count(f"## {TRANSPORT}") == 1 and text.count("## Beyond one server") == 1
    assert text.index("## Summary") < text.index("## Beyond one server") < text.index(f"## {TRANSPORT}")
    assert "Not measured yet: `python -m bench.footprint`" in text  # neither results nor a section

    render(results_dir, document)
    assert document.read_text() == text  # a second render changes nothing
