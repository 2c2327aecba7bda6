"""The LBGM math against hand-computed cases."""

import math

import pytest
import torch

from lbgm.common.lookback import (
    RebuiltGradient, aggregation_weights, all_finite, decide, decision_units, lookback_coefficient, rebuild,
    rebuild_is_finite, server_sgd_step, to_float32, weighted_sum,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_rho_and_phase_error_of_a_known_pair():
    # g = (3, 4), LBG = (1, 0): rho = 3 / 1, cos^2 = 9 / 25, error = 16 / 25.
    rho, error = lookback_coefficient([t(3, 4)], [t(1, 0)])
    assert rho == pytest.approx(3.0)
    assert error == pytest.approx(16 / 25)


def test_parallel_gradient_has_zero_error_and_its_scale_as_rho():
    rho, error = lookback_coefficient([t(-2, -4, 6)], [t(1, 2, -3)])
    assert rho == pytest.approx(-2.0)
    assert error == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_gradient_has_error_one():
    assert lookback_coefficient([t(0, 5)], [t(2, 0)]) == (0.0, 1.0)


def test_units_spanning_several_tensors_are_treated_as_one_vector():
    # Concatenated: g = (3, 4), LBG = (1, 0): same as the single-tensor case.
    rho, error = lookback_coefficient([t(3), t(4)], [t(1), t(0)])
    assert (rho, error) == pytest.approx((3.0, 16 / 25))


def test_zero_gradient_is_exactly_rho_zero_without_nan():
    rho, error = lookback_coefficient([t(0, 0)], [t(1, 2)])
    assert (rho, error) == (0.0, 0.0)
    decision = decide([t(0, 0)], [t(1, 2)], delta=0.1)
    assert decision.send_scalar and decision.rho == 0.0


def test_zero_lbg_cannot_represent_a_gradient_and_gives_no_nan():
    rho, error = lookback_coefficient([t(1, 2)], [t(0, 0)])
    assert (rho, error) == (0.0, 1.0)
    assert not decide([t(1, 2)], [t(0, 0)], delta=0.9).send_scalar


def test_both_zero_gives_no_nan():
    rho, error = lookback_coefficient([t(0.0)], [t(0.0)])
    assert not math.isnan(rho) and not math.isnan(error)


def test_first_round_without_lbg_sends_full():
    decision = decide([t(1, 1)], None, delta=1.0)
    assert not decision.send_scalar


def test_threshold_edge_error_equal_to_delta_sends_scalar():
    # g = (1, 1), LBG = (1, 0): error = 1/2 exactly.
    assert decide([t(1, 1)], [t(1, 0)], delta=0.5).send_scalar
    assert not decide([t(1, 1)], [t(1, 0)], delta=0.4999).send_scalar


def test_delta_zero_sends_full_even_for_a_parallel_gradient():
    assert not decide([t(2, 4)], [t(1, 2)], delta=0.0).send_scalar


def test_delta_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="delta"):
        decide([t(1.0)], [t(1.0)], delta=1.5)


def test_phase_error_is_clamped_into_unit_interval():
    g = torch.full((1000,), 0.1)
    _, error = lookback_coefficient([g], [g * 3])
    assert 0.0 <= error <= 1.0


def test_rho_is_a_float32_value():
    decision = decide([t(1 / 3, 0.0)], [t(1.0, 0.0)], delta=0.5)
    assert decision.rho == to_float32(1 / 3)


def test_unrepresentable_rho_falls_back_to_full():
    decision = decide([t(1e30)], [t(1e-30)], delta=0.5)
    assert not decision.send_scalar


def test_rebuild_scales_the_lbg_in_float32():
    lbg = (torch.tensor([1.0, -2.0], dtype=torch.float16),)
    (rebuilt,) = rebuild(lbg, 0.5)
    assert rebuilt.dtype == torch.float32
    assert torch.equal(rebuilt, t(0.5, -1.0))


def test_decision_units():
    assert decision_units(3, "layer") == [(0,), (1,), (2,)]
    assert decision_units(3, "model") == [(0, 1, 2)]
    with pytest.raises(ValueError):
        decision_units(3, "neuron")


def test_aggregation_weights_are_sample_shares():
    assert aggregation_weights([100, 300]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        aggregation_weights([0, 5])


def test_weighted_sum_per_layer():
    total = weighted_sum([[t(1, 1), t(2)], [t(3, 5), t(4)]], [0.25, 0.75])
    assert torch.allclose(total[0], t(2.5, 4.0)) and torch.allclose(total[1], t(3.5))


def test_weighted_sum_refuses_updates_of_other_lengths():
    with pytest.raises(ValueError, match="update 1 has 1 layers"):
        weighted_sum([[t(1), t(2)], [t(3)]], [0.5, 0.5])
    with pytest.raises(ValueError, match="more layers"):
        weighted_sum([[t(1)], [t(3), t(4)]], [0.5, 0.5])


def test_rebuilt_gradient_reads_as_payloads_and_products():
    payload, lbg = t(1, 2).to(torch.float16), t(3, -4)
    gradient = RebuiltGradient(sources=(payload, lbg), factors=(None, -0.5))
    first, second = list(gradient)
    assert first.dtype == torch.float32 and torch.equal(first, t(1, 2))
    assert torch.equal(second, rebuild([lbg], -0.5)[0]) and torch.equal(lbg, t(3, -4))  # the LBG is untouched
    assert len(gradient) == 2 and torch.equal(gradient[1], second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finiteness_from_the_extremes_matches_the_built_product(dtype):
    generator = torch.Generator().manual_seed(5)
    lbg = [torch.randn(300, generator=generator).to(dtype) * 1e3, torch.tensor([-2.5, 0.0, 7.0]).to(dtype),
           torch.empty(0, dtype=dtype)]
    biggest = 3.4028234663852886e38  # float32 max
    edge = biggest / float(lbg[0].abs().max())  # where the largest entry's product reaches float32's max
    border = [edge * (1 + step) for step in (-1e-6, -1e-7, 0.0, 1e-7, 1e-6)]
    for rho in (0.0, 1.0, -1.0, 1e30, -1e30, biggest / 7.0, 1e38, *border, *(-r for r in border)):
        built = all(bool(torch.isfinite(product).all()) for product in rebuild(lbg, rho))
        assert rebuild_is_finite(lbg, rho) == built, rho


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_the_elementwise_mask(dtype):
    generator = torch.Generator().manual_seed(11)
    clean = torch.randn(1000, generator=generator).to(dtype)
    cases = [clean, torch.empty(0, dtype=dtype), torch.full((3,), torch.finfo(dtype).max, dtype=dtype)]
    for bad in (math.nan, math.inf, -math.inf):
        for position in (0, 517, 999):
            poisoned = clean.clone()
            poisoned[position] = bad
            cases.append(poisoned)
    both = clean.clone()
    both[3], both[4] = math.inf, math.nan
    cases.append(both)
    for tensor in cases:
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
    assert sum(not all_finite(tensor) for tensor in cases) == 10


def test_weighted_sum_of_rebuilt_gradients_equals_the_materialized_sum_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    lbgs = [torch.randn(50, generator=generator).to(torch.float16) for _ in range(3)]
    lazy = [RebuiltGradient(sources=(lbg, torch.randn(7, generator=generator)), factors=(rho, None))
            for lbg, rho in zip(lbgs, (0.3, -1.7, 2.5))]
    materialized = [[layer.clone() for layer in gradient] for gradient in lazy]
    weights = [0.2, 0.5, 0.3]
    for got, expected in zip(weighted_sum(lazy, weights), weighted_sum(materialized, weights), strict=True):
        assert torch.equal(got, expected)


def test_server_step_plain_sgd():
    params, velocity = server_sgd_step([t(1, 1)], [t(2, -2)], None, lr=0.5, momentum=0.0)
    assert torch.equal(params[0], t(0, 2)) and velocity is None


def test_server_step_heavy_ball_matches_torch_sgd():
    weight = torch.nn.Parameter(t(1.0, -1.0))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    params, velocity = [weight.detach().clone()], None
    for gradient in (t(1.0, 2.0), t(-0.5, 0.25), t(3.0, 1.0)):
        weight.grad = gradient.clone()
        optimizer.step()
        params, velocity = server_sgd_step(params, [gradient], velocity, lr=0.1, momentum=0.9)
    assert torch.allclose(params[0], weight.detach())
