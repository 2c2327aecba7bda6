"""The gradient-space analysis (N95/N99 per layer) on matrices of known rank, and one real run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn import functional as F

from lbgm.cli.analyze import add_parser
from lbgm.cli.main import UsageError
from lbgm.report.gradient_space import OUTPUT_FILES
from lbgm.tasks.models import build_model
from lbgm.sim.gradient_space import (
    components_for_fraction, counts_per_epoch, gram_matrix, record_epoch_gradients, squared_singular_values,
)

torch.set_num_threads(1)


def directions(count: int, size: int = 40) -> list[torch.Tensor]:
    """`count` orthonormal vectors of length `size`, fixed by a seed."""
    q, _ = torch.linalg.qr(torch.randn(size, count, generator=torch.Generator().manual_seed(7)))
    return list(q.T)


def lbgm_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbgm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_gram_eigenvalues_are_the_squared_singular_values():
    rows = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.svdvals(rows.double()) ** 2
    assert torch.allclose(squared_singular_values(gram_matrix(list(rows))), expected, rtol=1e-10)


def test_the_count_is_the_fewest_top_values_reaching_the_fraction():
    values = torch.tensor([4.0, 1.0])  # the top one explains 80%
    assert components_for_fraction(values, 0.80) == 1
    assert components_for_fraction(values, 0.81) == 2
    assert components_for_fraction(values, 1.0) == 2
    assert components_for_fraction(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1


def test_a_fraction_outside_zero_to_one_is_refused_with_its_value():
    with pytest.raises(ValueError, match="got 1.5"):
        components_for_fraction(torch.tensor([1.0]), 1.5)


def test_gradients_spanning_two_directions_need_two_components_from_the_second_epoch_on():
    u, v = directions(2)
    rows = [u, v, u + v, 2 * u - v, -u + 3 * v, 0.5 * u + 0.5 * v]
    assert counts_per_epoch(rows, 0.99) == (1, 2, 2, 2, 2, 2)
    assert counts_per_epoch(rows, 0.95) == (1, 2, 2, 2, 2, 2)


def test_one_dominant_direction_with_tiny_noise_needs_one_component_for_95_percent():
    (u,) = directions(1)
    noise = torch.randn(8, 40, generator=torch.Generator().manual_seed(3))
    rows = [(1.0 + 0.1 * i) * u + 1e-3 * noise[i] for i in range(8)]
    assert counts_per_epoch(rows, 0.95) == (1,) * 8


def test_counts_never_exceed_the_epochs_so_far():
    rows = list(torch.randn(6, 50, generator=torch.Generator().manual_seed(5)))  # full rank: 6 directions
    n95, n99 = counts_per_epoch(rows, 0.95), counts_per_epoch(rows, 0.99)
    assert all(a <= b <= e for e, (a, b) in enumerate(zip(n95, n99), start=1))
    assert n99[-1] == 6


def test_a_single_epoch_is_one_component():
    (u,) = directions(1)
    assert counts_per_epoch([u], 0.95) == (1,)
    assert counts_per_epoch([u], 0.99) == (1,)


def test_all_zero_gradients_count_zero_components_without_nan():
    zeros = [torch.zeros(40) for _ in range(3)]
    assert counts_per_epoch(zeros, 0.99) == (0, 0, 0)
    (u,) = directions(1)
    counts = counts_per_epoch([*zeros, u], 0.95)
    assert counts == (0, 0, 0, 1) and all(isinstance(count, int) for count in counts)


def test_an_epoch_gradient_is_the_sum_of_its_minibatch_gradients():
    # With lr 0 the model never moves, so each epoch's four 16-sample minibatch
    # gradients add up to 4 times the full-data mean gradient, whatever the order.
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(64) % 10
    model = build_model("fcn", seed=0)
    full = torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))
    history = record_epoch_gradients(model, images, labels, epochs=3, batch_size=16, lr=0.0, seed=0, progress=False)
    for (name, rows), expected in zip(history.rows.items(), full, strict=True):
        assert len(rows) == 3
        for row in rows:
            assert torch.allclose(row, 4 * expected.reshape(-1), atol=1e-5), name
        assert counts_per_epoch(rows, 0.99) == (1, 1, 1)


def test_analyze_gradients_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "analysis"
    args = lbgm_parser().parse_args(["analyze-gradients", "--dataset", "mnist-embedded", "--model", "mlp",
                                     "--epochs", "3", "--batch-size", "64", "--lr", "0.05",
                                     "--max-samples", "2000", "--out", str(out)])
    assert args.func(args) == 0
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "gradient_space.json").read_text())
    names = [name for name, _ in build_model("mlp", seed=0).named_parameters()]
    assert [layer["name"] for layer in report["layers"]] == names
    for layer in report["layers"]:
        assert len(layer["n95"]) == len(layer["n99"]) == 3
        assert all(1 <= a <= b <= 3 for a, b in zip(layer["n95"], layer["n99"]))
    assert report["train_samples"] == 2000
    printed = capsys.readouterr().out
    assert "| layer | values | N95 | N99 | epochs |" in printed
    assert printed.startswith((out / "gradient_space.md").read_text())


@pytest.mark.parametrize("options, fragments", [
    (["--epochs", "1"], ["--epochs must be >= 2", "got 1"]),
    (["--model", "resnet1000"], ["--model must be one of", "'cnn'", "got 'resnet1000'"]),
    (["--dataset", "cifar-7"], ["--dataset must be one of", "'mnist-embedded'", "got 'cifar-7'"]),
    (["--dataset", "mnist"], ["--dataset mnist needs --data-dir"]),
    (["--data-dir", "/nonexistent/data"], ["--data-dir /nonexistent/data is not a folder"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
])
def test_user_mistakes_are_usage_errors_naming_the_wrong_value(options, fragments, tmp_path):
    args = lbgm_parser().parse_args(["analyze-gradients", "--out", str(tmp_path), *options])
    with pytest.raises(UsageError) as error:
        args.func(args)
    assert all(fragment in str(error.value) for fragment in fragments), str(error.value)


def test_every_option_has_help():
    subcommand = lbgm_parser()._subparsers._group_actions[0].choices["analyze-gradients"]
    for action in subcommand._actions:
        assert action.help, action.option_strings
