"""The analysis options the paper's recipe needs (momentum sums, centering, weight decay), the plot's
ceiling, and the gradients within an in-process federation (lbgm analyze-gradients --federated)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from lbgm.cli.analyze import add_parser
from lbgm.cli.main import UsageError
from lbgm.experiment.config import load_config
from lbgm.report.gradient_space import panels_figure, report_figure
from lbgm.report.runs import ReportError
from lbgm.sim.federation import simulate
from lbgm.sim.gradient_space import (
    AnalysisSettings, LayerSpectrum, RoundRecorder, Treatment, counts_per_epoch, gram_matrix, layer_gram, momentum_matrix,
    record_epoch_gradients, run_analysis,
)
from lbgm.tasks.models import build_model

from test_gradient_space import directions, lbgm_parser

torch.set_num_threads(1)

TINY_FEDERATION = """
[experiment]
dataset = "mnist-embedded"
model = "mlp"
partition = "shards"
workers = 4
rounds = 5
batch_size = 0
local_lr = 0.1
update_norm_bound = 0.0
loss_guard_ratio = 0.0
"""


def test_momentum_matrix_accumulates_v_e_equal_m_v_previous_plus_g_e():
    rows = torch.randn(4, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, v = [], torch.zeros(7, dtype=torch.float64)
    for g in rows:
        v = 0.9 * v + g
        expected.append(v)
    assert torch.allclose(momentum_matrix(4, 0.9) @ rows, torch.stack(expected), rtol=1e-12)


def test_treated_gram_is_the_gram_of_the_accumulated_and_centered_rows():
    rows = list(torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) + 0.3)
    accumulated = momentum_matrix(5, 0.9) @ torch.stack(rows).double()
    centered = accumulated - accumulated.mean(dim=1, keepdim=True)
    assert torch.allclose(layer_gram(rows, Treatment(momentum=0.9, centered=True)), centered @ centered.T, rtol=1e-10)


def test_momentum_zero_leaves_the_raw_gram_and_counts_exactly():
    rows = list(torch.randn(6, 50, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(layer_gram(rows, Treatment(momentum=0.0)), gram_matrix(rows))
    assert counts_per_epoch(rows, 0.95, Treatment(momentum=0.0)) == counts_per_epoch(rows, 0.95)


def test_momentum_folds_a_small_new_direction_into_the_old_one():
    # Rows u, 0.3 v: squared singular values 1 and 0.09, the top one explains 91.7%, so N95 = 2.
    # Momentum 0.9 analyses u and 0.9 u + 0.3 v: Gram [[1, .9], [.9, .9]], eigenvalues 1.8514 and
    # 0.0486, the top one explains 97.4%: N95 = 1, N99 still 2.
    u, v = directions(2)
    rows = [u, 0.3 * v]
    assert counts_per_epoch(rows, 0.95) == (1, 2)
    assert counts_per_epoch(rows, 0.95, Treatment(momentum=0.9)) == (1, 1)
    assert counts_per_epoch(rows, 0.99, Treatment(momentum=0.9)) == (1, 2)


def test_centering_removes_a_shared_constant_offset():
    (u,) = directions(1)
    w = u - u.mean()  # zero mean over its entries
    ones = torch.ones_like(u)
    rows = [ones, ones + 3 * w]
    assert counts_per_epoch(rows, 0.99) == (1, 2)
    assert counts_per_epoch(rows, 0.99, Treatment(centered=True)) == (0, 1)  # the first row centres to zero


def test_unit_rows_count_a_small_new_direction_like_a_large_one():
    u, v = directions(2)
    rows = [u, 0.01 * v]  # the second direction holds 0.01% of the variance
    assert counts_per_epoch(rows, 0.99) == (1, 1)
    assert counts_per_epoch(rows, 0.95, Treatment(unit_rows=True)) == (1, 2)
    assert counts_per_epoch([u, 5 * u, torch.zeros_like(u)], 0.99, Treatment(unit_rows=True)) == (1, 1, 1)


def test_weight_decay_adds_its_gradient_to_the_recorded_one():
    # lr 0: the model stays put, so each epoch's four minibatch gradients add up to
    # 4 x (the full-data mean gradient + weight_decay x theta).
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(64) % 10
    model = build_model("fcn", seed=0)
    params = list(model.parameters())
    full = torch.autograd.grad(F.cross_entropy(model(images), labels), params)
    history = record_epoch_gradients(model, images, labels, epochs=2, batch_size=16, lr=0.0, seed=0,
                                     progress=False, weight_decay=0.01)
    for rows, gradient, param in zip(history.rows.values(), full, params, strict=True):
        for row in rows:
            assert torch.allclose(row, 4 * (gradient + 0.01 * param.detach()).reshape(-1), atol=1e-5)


def test_the_command_applies_momentum_and_centering_to_the_recorded_gradients(tmp_path):
    options = ["--model", "mlp", "--epochs", "4", "--max-samples", "600", "--batch-size", "100"]
    args = lbgm_parser().parse_args(["analyze-gradients", *options, "--momentum", "0.9", "--centered",
                                     "--out", str(tmp_path)])
    assert args.func(args) == 0
    written = json.loads((tmp_path / "gradient_space.json").read_text())
    assert (written["momentum"], written["centered"]) == (0.9, True)
    model = build_model("mlp", seed=0)
    from lbgm.tasks.datasets import load_dataset
    train = load_dataset("mnist-embedded", "train", None)
    history = record_epoch_gradients(model, train.images[:600], train.labels[:600], 4, 100, 0.05, 0, progress=False)
    treatment = Treatment(momentum=0.9, centered=True)
    for layer, rows in zip(written["layers"], history.rows.values(), strict=True):
        assert layer["n99"] == list(counts_per_epoch(rows, 0.99, treatment))
        assert layer["n95"] == list(counts_per_epoch(rows, 0.95, treatment))


def test_recount_gives_the_counts_of_a_run_with_that_treatment_without_training(tmp_path):
    common = ["analyze-gradients", "--model", "mlp", "--epochs", "4", "--max-samples", "600", "--batch-size", "100"]
    for out, extra in [("treated", ["--momentum", "0.9", "--centered"]), ("raw", [])]:
        args = lbgm_parser().parse_args([*common, *extra, "--out", str(tmp_path / out)])
        assert args.func(args) == 0
    args = lbgm_parser().parse_args(["analyze-gradients", "--recount", str(tmp_path / "raw"), "--momentum", "0.9",
                                     "--centered", "--out", str(tmp_path / "recounted")])
    assert args.func(args) == 0
    treated, recounted = (json.loads((tmp_path / out / "gradient_space.json").read_text())
                          for out in ("treated", "recounted"))
    assert recounted == treated


def test_the_plot_draws_the_ceiling_n_equal_epochs_in_every_panel():
    report = run_analysis(AnalysisSettings(dataset="mnist-embedded", model="mlp", epochs=3, batch_size=100, lr=0.05,
                                           max_samples=300), progress=False)
    figure = report_figure(report)
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert len(panels) == len(report.layers)
    for axis in panels:
        ceiling = [line for line in axis.get_lines() if "ceiling" in line.get_label()]
        assert len(ceiling) == 1
        assert list(ceiling[0].get_xdata()) == list(ceiling[0].get_ydata()) == [1, 2, 3]


def test_the_ceiling_stops_at_the_layers_number_of_values():
    layer = LayerSpectrum(name="bias", num_values=2, n95=(1, 1, 1, 1), n99=(1, 2, 2, 2))
    figure = panels_figure([layer], [{"N99": layer.n99, "N95": layer.n95}], "epoch", "two values")
    (ceiling,) = [line for line in figure.axes[0].get_lines() if "ceiling" in line.get_label()]
    assert list(ceiling.get_ydata()) == [1, 2, 2, 2]


def test_the_recorder_sees_true_gradients_whose_mean_is_the_servers_step(tmp_path):
    # With delta 0 and without momentum, clipping or the loss guard the server steps by local_lr x the
    # weighted mean of the true gradients.
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FEDERATION)
    config = load_config(path, {"rounds": 3, "delta": 0.0})
    recorder = RoundRecorder(tracked=[1, 2], rounds=config.rounds, progress=False)
    simulate(config, evaluate_every_round=False, observe=recorder)
    assert all(len(rows) == 3 for series in recorder.workers.values() for rows in series)
    for mean_rows, update_rows in zip(recorder.aggregate, recorder.global_update, strict=True):
        for mean, update in zip(mean_rows, update_rows, strict=True):
            assert torch.allclose(update, 0.1 * mean, atol=1e-6)
    assert not torch.equal(recorder.workers[1][0][0], recorder.workers[2][0][0])


def test_federated_mode_counts_at_most_the_rounds_per_worker_and_for_the_aggregate(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FEDERATION)
    out = tmp_path / "out"
    args = lbgm_parser().parse_args(["analyze-gradients", "--federated", "--config", str(path), "--rounds", "4",
                                     "--track-workers", "3", "--out", str(out)])
    assert args.func(args) == 0
    written = json.loads((out / "gradient_space.json").read_text())
    assert written["config"]["delta"] == 0.0 and written["config"]["rounds"] == 4
    assert sorted(written["workers"]) == ["1", "2", "3"]
    for series in [written["aggregate"], written["global_update"], *written["workers"].values()]:
        for layer in series:
            assert len(layer["n95"]) == 4
            assert all(1 <= a <= b <= e for e, (a, b) in enumerate(zip(layer["n95"], layer["n99"]), start=1))
    assert (out / "gradient_space.png").stat().st_size > 0
    assert "| layer | values | workers N95 median / max |" in capsys.readouterr().out


@pytest.mark.parametrize("options, fragment", [
    (["--federated"], "--federated needs --config"),
    (["--federated", "--config", "/nonexistent.toml"], "--config /nonexistent.toml is not a file"),
    (["--config", "CONFIG"], "--config and --rounds need --federated"),
    (["--federated", "--config", "CONFIG", "--track-workers", "5"], "--track-workers must be <= the config's 4 workers, got 5"),
    (["--federated", "--config", "CONFIG", "--rounds", "1"], "--rounds must be >= 2"),
    (["--momentum", "1.5"], "--momentum must lie in [0, 1], got 1.5"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0, got -1.0"),
    (["--epochs", "1"], "--epochs must be >= 2"),
    (["--recount", "/nonexistent/run"], "--recount /nonexistent/run is not a folder"),
])
def test_bad_options_are_one_line_usage_errors(options, fragment, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FEDERATION)
    options = [str(path) if option == "CONFIG" else option for option in options]
    args = lbgm_parser().parse_args(["analyze-gradients", "--out", str(tmp_path / "out"), *options])
    with pytest.raises(UsageError) as error:
        args.func(args)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_recounting_a_folder_without_an_analysis_names_it(tmp_path):
    args = lbgm_parser().parse_args(["analyze-gradients", "--recount", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(ReportError, match=f"cannot read the analysis in {tmp_path}"):
        args.func(args)
    assert not (tmp_path / "out").exists()
