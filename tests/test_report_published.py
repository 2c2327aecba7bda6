"""`lbgm report --published`: figures from elsewhere drawn and tabled beside the runs' own accuracy,
on archived records of a real run (docs/results); a bad file is refused with one line, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbgm.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "docs/results/mnist-downlink/records/mnist-cnn-delta0"  # the paper's MNIST setting, delta 0


def test_published_points_are_tabled_beside_the_runs_accuracy_at_their_round(tmp_path: Path, capsys) -> None:
    points = tmp_path / "points.csv"
    points.write_text("series,round,accuracy\nsomeone's FedAvg,47,0.91\nsomeone's FedAvg,100,0.95\n")
    assert main(["report", str(RUN), "--out", str(tmp_path / "out"), "--published", str(points)]) == 0
    report = (tmp_path / "out/report.md").read_text()
    # this run first reached 0.9 at round 47 (0.9009) and ended at 0.9512 (its summary.json)
    assert "| someone's FedAvg | 47 | 0.9100 | 0.9009 |" in report
    assert "| someone's FedAvg | 100 | 0.9500 | 0.9512 |" in report
    assert (tmp_path / "out/accuracy_vs_rounds.png").stat().st_size > 0


@pytest.mark.parametrize("text, message", [
    ("round,accuracy\n3,0.5\n", "the first line must be the header series,round,accuracy"),
    ("series,round,accuracy\nx,three,0.5\n", ":2: expected series,round,accuracy"),
    ("series,round,accuracy\nx,3,1.5\n", ":2: needs a series name, a round >= 0 and an accuracy in [0, 1]"),
    ("series,round,accuracy\n", "no points after the header"),
])
def test_a_bad_points_file_is_refused_with_one_line_and_nothing_written(tmp_path: Path, capsys, text: str,
                                                                        message: str) -> None:
    points = tmp_path / "points.csv"
    points.write_text(text)
    assert main(["report", str(RUN), "--out", str(tmp_path / "out"), "--published", str(points)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
