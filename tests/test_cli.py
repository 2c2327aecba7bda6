"""The command line: the one-command federation, and clear errors for user mistakes."""

from __future__ import annotations

import json
import subprocess

import pytest

from lbgm.experiment.config import ConfigError, ExperimentConfig, config_to_toml, load_config

from conftest import lbgm


def run(*args, cwd=None, timeout=300):
    return subprocess.run(lbgm(*args), capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_lbgm_run_trains_a_federation_and_prints_a_summary(tmp_path):
    result = run("run", "--model", "mlp", "--workers", "3", "--processes", "2", "--rounds", "4",
                 "--local-steps", "1", "--batch-size", "0", "--local-lr", "0.5", "--delta", "0.5",
                 "--name", "smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "LBGM run summary" in result.stdout and "saved" in result.stdout
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert summary["rounds_completed"] == 4
    assert (tmp_path / "smoke" / "logs" / "server.log").exists()


def test_cnn_federation_streams_multi_chunk_tensors(tmp_path):
    # The CNN's 800x500 layer is 1.6 MB: model downloads and full uploads span two 1 MiB chunks.
    result = run("run", "--model", "cnn", "--workers", "2", "--rounds", "2", "--local-steps", "2",
                 "--batch-size", "16", "--name", "cnn", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "cnn" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["uplink_by_kind"]["full"] > 2 * 1_600_000
    assert records[0]["downlink_by_kind"]["model"] > 2 * 1_700_000


@pytest.mark.parametrize("args, message", [
    (["run", "--delta", "1.5"], "delta must lie in [0, 1]"),
    (["run", "--model", "resnet1000"], "model must be one of"),
    (["run", "--config", "/nonexistent.toml"], "does not exist"),
    (["run", "--workers", "2", "--processes", "5"], "--processes must lie in"),
    (["worker", "--server", "nohostport"], "HOST:PORT"),
    (["status", "--server", "127.0.0.1:1"], "cannot reach"),
])
def test_user_mistakes_give_one_line_errors_without_traceback(args, message, tmp_path):
    result = run(*args, "--out-dir", str(tmp_path)) if args[0] == "run" else run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_documents_every_experiment_setting():
    text = run("run", "--help").stdout
    for flag in ("--delta", "--granularity", "--local-steps", "--error-feedback", "--fraction", "--round-timeout"):
        assert flag in text


def test_config_file_round_trips_and_flags_override(tmp_path):
    path = tmp_path / "exp.toml"
    config = ExperimentConfig(name="x", delta=0.3, error_feedback=True, workers=7)
    path.write_text(config_to_toml(config))
    assert load_config(path) == config
    assert load_config(path, {"delta": 0.1}).delta == 0.1


@pytest.mark.parametrize("text, message", [
    ("delta = 'high'", "delta must be a float"),
    ("deltaa = 0.2", "unknown setting 'deltaa'"),
    ("workers = [", "not valid TOML"),
    ("workers = 0", "workers must be >= 1"),
])
def test_bad_config_files_are_explained(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path)


def test_shipped_experiment_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)
