"""Sweeps and reports: the table's maths on hand-written records, and one real sweep over gRPC."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest

from lbgm.cli import report, sweep
from lbgm.cli.main import UsageError
from lbgm.report.comparison import Savings, TargetHit, build_rows, format_table, rounds_to_target, savings
from lbgm.report.plots import write_report
from lbgm.report.runs import ReportError, Run, archive_runs, load_runs
from lbgm.sweep.grid import SweepError, grid_configs, read_sweep_table, run_name
from lbgm.sweep.runner import is_complete
from lbgm.experiment.config import ExperimentConfig, config_to_toml

from conftest import FAST

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(number: int, accuracy: float, uplink: int = 100, full_equivalent: int = 400) -> dict:
    """A metrics.jsonl round with the fields the report reads."""
    return {"round": number, "test_accuracy": accuracy, "uplink_bytes": uplink, "downlink_bytes": 0,
            "full_equivalent_uplink_bytes": full_equivalent, "floats_uploaded": 0, "full_equivalent_floats": 0,
            "full_units": 0, "scalar_units": 0, "refused": {}}


def run(name: str, accuracies: list[float], uplink: int = 100, **settings) -> Run:
    config = {"name": name, "delta": 0.2, "seed": 0, "error_feedback": False, "granularity": "layer", **settings}
    records = tuple(record(i, accuracy, uplink) for i, accuracy in enumerate(accuracies, start=1))
    return Run(name, Path(name), config, records)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lbgm")
    commands = parser.add_subparsers(dest="command", required=True)
    sweep.add_parser(commands)
    report.add_parser(commands)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ rounds to a target accuracy

def test_target_reached_in_round_one_costs_only_that_rounds_uplink():
    records = [record(1, 0.95, uplink=70), record(2, 0.97, uplink=30)]
    assert rounds_to_target(records, 0.9) == TargetHit(round=1, uplink_bytes=70, total_bytes=70)


def test_target_never_reached_gives_none():
    assert rounds_to_target([record(1, 0.5), record(2, 0.89999)], 0.9) is None


def test_reaching_the_target_exactly_counts_and_uplink_is_cumulative():
    records = [record(1, 0.5, uplink=10), record(2, 0.8, uplink=20), record(3, 0.9, uplink=40)]
    assert rounds_to_target(records, 0.9) == TargetHit(round=3, uplink_bytes=70, total_bytes=70)


# ------------------------------------------------------------------ savings against delta = 0

def test_savings_are_measured_against_the_delta0_run_with_the_same_settings():
    lbgm, fedavg = run("lbgm", [0.5, 0.6], uplink=100), run("fedavg", [0.5, 0.6], uplink=400, delta=0.0)
    assert savings(lbgm, [lbgm, fedavg]) == Savings(uplink=0.75, downlink=0.0, total=0.75, baseline="fedavg")
    assert savings(fedavg, [lbgm, fedavg]) == Savings(uplink=0.0, downlink=0.0, total=0.0, baseline="fedavg")


def test_the_delta0_baseline_may_differ_in_error_feedback_and_granularity():
    lbgm = run("lbgm", [0.5], uplink=100, error_feedback=True, granularity="model")
    fedavg = run("fedavg", [0.5], uplink=200, delta=0.0)
    assert savings(lbgm, [lbgm, fedavg]) == Savings(uplink=0.5, downlink=0.0, total=0.5, baseline="fedavg")


def test_bookkeeping_settings_neither_break_the_baseline_nor_make_columns():
    lbgm = run("lbgm", [0.5], uplink=100, checkpoint_every=1, data_dir="/a", eval_batch_size=500)
    fedavg = run("fedavg", [0.5], uplink=200, delta=0.0, checkpoint_every=5, data_dir="/b", eval_batch_size=1000)
    assert savings(lbgm, [lbgm, fedavg]) == Savings(uplink=0.5, downlink=0.0, total=0.5, baseline="fedavg")
    header = format_table(build_rows([lbgm, fedavg], 0.9), 0.9).splitlines()[0]
    assert not any(key in header for key in ("checkpoint_every", "data_dir", "eval_batch_size"))


def test_without_a_delta0_twin_savings_fall_back_to_the_runs_own_full_equivalent():
    lbgm = run("lbgm", [0.5, 0.6], uplink=100)  # full equivalent: 400 bytes a round
    other_seed = run("fedavg-seed1", [0.5, 0.6], uplink=300, delta=0.0, seed=1)
    assert savings(lbgm, [lbgm, other_seed]) == Savings(uplink=0.75, downlink=0.0, total=0.75, baseline=None)


def test_a_delta0_run_with_fewer_completed_rounds_is_no_baseline():
    lbgm, interrupted = run("lbgm", [0.5, 0.6, 0.7]), run("fedavg", [0.5], uplink=400, delta=0.0)
    assert savings(lbgm, [lbgm, interrupted]).baseline is None


def test_estimated_savings_are_marked_and_explained_in_a_footnote():
    table = format_table(build_rows([run("lbgm", [0.5, 0.6])], 0.9), 0.9)
    assert "75.0% †" in table
    assert "† No delta = 0 run with otherwise identical settings" in table


# ------------------------------------------------------------------ the table

def test_table_has_a_row_per_run_and_columns_only_for_settings_that_differ():
    runs = [run("a", [0.5, 0.95], seed=0, workers=2), run("b", [0.4, 0.5], seed=1, workers=2)]
    lines = format_table(build_rows(runs, 0.9), 0.9).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:3] == ["run", "delta", "seed"] and "workers" not in header
    assert "total saved" in header
    assert lines[2].startswith("| a | 0.2 | 0 | 0.9500 | 0.9500 | 200 |") and lines[2].endswith("| 2 | 200 | 200 |")
    assert lines[3].endswith("| not reached | not reached | not reached |")


def test_runs_without_accuracy_report_their_test_loss_in_the_table_and_the_plots(tmp_path):
    """A regression task measures no accuracy: the table and the plots show the test loss instead."""
    runs = [dataclasses.replace(run(name, [math.nan] * 3, uplink=uplink, delta=delta),
                                records=tuple({**record(i, math.nan, uplink), "test_loss": 5.0 - i}
                                              for i in range(1, 4)))
            for name, delta, uplink in (("lbgm", 0.2, 60), ("fedavg", 0.0, 100))]
    table = write_report(runs, tmp_path, 0.9, "regression")
    lines = table.splitlines()
    assert lines[0] == ("| run | delta | final test loss | uplink bytes | uplink saved | downlink bytes | "
                        "downlink saved | total bytes | total saved |")
    assert lines[2] == "| lbgm | 0.2 | 2.0000 | 180 | 40.0% | 0 | 0.0% | 180 | 40.0% |"
    for name in ("accuracy_vs_uplink.png", "accuracy_vs_total_bytes.png", "accuracy_vs_rounds.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


# ------------------------------------------------------------------ the grid

def test_grid_values_take_the_type_of_their_setting():
    assert sweep.parse_grid_option("delta=0,0.5") == ("delta", [0.0, 0.5])
    assert sweep.parse_grid_option("workers=2,3") == ("workers", [2, 3])
    assert sweep.parse_grid_option("error-feedback=true,false") == ("error_feedback", [True, False])
    assert sweep.parse_grid_option("partition=iid,shards") == ("partition", ["iid", "shards"])


@pytest.mark.parametrize("option, message", [
    ("deltaa=0,1", "unknown setting 'deltaa'"),
    ("delta=0,high", "--grid delta: expected a float, got 'high'"),
    ("workers=2.5", "--grid workers: expected a int, got '2.5'"),
    ("error_feedback=maybe", "expected true or false, got 'maybe'"),
    ("delta", "--grid expects KEY=V1,V2,..., got 'delta'"),
    ("name=a,b", "'name' cannot be swept"),
])
def test_bad_grid_options_name_the_key_or_value(option, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        sweep.parse_grid_option(option)


def test_a_key_given_twice_on_the_command_line_is_refused():
    with pytest.raises(UsageError, match="--grid delta is given twice"):
        sweep.grid_from_options(["delta=0", "delta=0.5"])


def test_run_names_are_stable_and_safe_as_folder_names():
    base = ExperimentConfig(name="exp")
    configs = grid_configs(base, {"delta": [0, 0.5], "seed": [1]})
    assert [config.name for config in configs] == ["exp-delta0-seed1", "exp-delta0.5-seed1"]
    assert run_name("exp", {"data_dir": "a/b c"}) == "exp-data_dira_b_c"


def test_grid_points_out_of_range_are_refused_before_any_run():
    with pytest.raises(SweepError, match=r"delta must lie in \[0, 1\], got 1.5"):
        grid_configs(ExperimentConfig(), {"delta": [0.2, 1.5]})


def test_sweep_table_of_the_base_file_is_read_and_checked(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[experiment]\nrounds = 3\n\n[sweep]\ndelta = [0.0, 0.2]\nseed = [0, 1]\n")
    bad.write_text("[experiment]\nrounds = 3\n\n[sweep]\ndelta = 0.2\n")
    assert read_sweep_table(good) == {"delta": [0.0, 0.2], "seed": [0, 1]}
    with pytest.raises(SweepError, match="delta must be a non-empty list"):
        read_sweep_table(bad)


def test_only_a_finished_run_of_the_same_settings_is_skipped():
    config = ExperimentConfig(rounds=3)
    finished = {"rounds_completed": 3, "config": dataclasses.asdict(config)}
    assert is_complete(finished, config)
    assert not is_complete({**finished, "rounds_completed": 2}, config)
    assert not is_complete(finished, ExperimentConfig(rounds=3, seed=1))
    assert not is_complete(None, config)


# ------------------------------------------------------------------ reading run folders

def test_a_folder_without_runs_is_named_in_the_error(tmp_path):
    with pytest.raises(ReportError, match=f"{tmp_path} holds no run"):
        load_runs([tmp_path])


def test_an_empty_metrics_file_is_explained(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "config.toml").write_text(config_to_toml(ExperimentConfig()))
    with pytest.raises(ReportError, match="metrics.jsonl holds no rounds yet"):
        load_runs([tmp_path])


def test_a_corrupt_archived_metrics_file_is_named_in_the_error(tmp_path):
    (tmp_path / "metrics.jsonl.gz").write_bytes(b"not gzip")
    (tmp_path / "config.toml").write_text(config_to_toml(ExperimentConfig()))
    with pytest.raises(ReportError, match="cannot read .*metrics.jsonl.gz"):
        load_runs([tmp_path])


def test_archiving_refuses_clashing_names_and_the_runs_own_folder_before_writing(tmp_path):
    first, second = (Run("same", tmp_path / side / "same", {}, (record(1, 0.5),)) for side in ("a", "b"))
    with pytest.raises(ReportError, match="share a folder name: \\['same'\\]"):
        archive_runs([first, second], tmp_path / "archive")
    with pytest.raises(ReportError, match="overwrite run"):
        archive_runs([first], tmp_path / "a")
    other_run = tmp_path / "runs" / "same"  # an unrelated run folder of the same name keeps its records
    other_run.mkdir(parents=True)
    (other_run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ReportError, match="holds a run's metrics.jsonl"):
        archive_runs([first], tmp_path / "runs")
    assert (other_run / "metrics.jsonl").read_text() == "{}\n" and not (other_run / "metrics.jsonl.gz").exists()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "same").write_text("a file")
    with pytest.raises(ReportError, match="is not a folder"):
        archive_runs([first], tmp_path / "files")
    assert not (tmp_path / "archive").exists() and not (tmp_path / "a").exists()


# ------------------------------------------------------------------ one real sweep over localhost gRPC

def test_a_real_sweep_runs_each_grid_point_reports_them_and_resumes(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text(config_to_toml(ExperimentConfig(name="grid", workers=2, rounds=3, **FAST)))
    runs = tmp_path / "runs"
    sweep_args = parse("sweep", "--config", str(base), "--grid", "delta=0,0.5", "--out-dir", str(runs),
                       "--processes", "1", "--log-level", "WARNING")

    assert sweep_args.func(sweep_args) == 0
    for name in ("grid-delta0", "grid-delta0.5"):
        assert json.loads((runs / name / "summary.json").read_text())["rounds_completed"] == 3
    assert "total saved" in capsys.readouterr().out

    out = tmp_path / "report"
    report_args = parse("report", str(runs), "--out", str(out), "--target-accuracy", "0.5")
    assert report_args.func(report_args) == 0
    for plot in ("accuracy_vs_uplink.png", "accuracy_vs_total_bytes.png", "accuracy_vs_rounds.png"):
        assert (out / plot).read_bytes().startswith(PNG_SIGNATURE) and (out / plot).stat().st_size > 1000
    markdown = (out / "report.md").read_text()
    assert "total saved" in markdown and "| run | task | model |" in markdown  # the downlink by kind
    assert [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| grid-")] == [
        "grid-delta0", "grid-delta0.5"] * 2  # the bytes table, then the downlink by kind
    assert "†" not in markdown  # the delta = 0 run is a measured baseline for both

    archive, redrawn = tmp_path / "archive", tmp_path / "redrawn"
    archive_args = parse("report", str(runs), "--out", str(out), "--target-accuracy", "0.5",
                         "--archive", str(archive))
    assert archive_args.func(archive_args) == 0
    assert sorted(path.name for path in (archive / "grid-delta0").iterdir()) == [
        "config.toml", "metrics.jsonl.gz", "partition.txt", "summary.json"]  # no checkpoint, model or logs
    redraw_args = parse("report", str(archive), "--out", str(redrawn), "--target-accuracy", "0.5")
    assert redraw_args.func(redraw_args) == 0
    assert (redrawn / "report.md").read_text() == markdown

    capsys.readouterr()
    assert sweep_args.func(sweep_args) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skipped (already complete in") == 2
