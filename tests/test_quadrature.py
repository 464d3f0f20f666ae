"""Quadrature nodes and weights, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from xclip.core.quadrature import (
    MIN_ADAPTIVE_STEPS,
    PANEL_NODES,
    PathIntegral,
    PathQuadrature,
    _rank_within_item,
    quadrature,
)
from xclip.errors import ConfigError


def test_gauss_legendre_closed_forms():
    alphas, weights = quadrature("gauss-legendre", 1)
    assert alphas.tolist() == [0.5] and weights.tolist() == [1.0]
    alphas, weights = quadrature("gauss-legendre", 2)
    torch.testing.assert_close(alphas, torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    alphas, weights = quadrature("gauss-legendre", 3)
    half_width = 0.5 * math.sqrt(3 / 5)
    torch.testing.assert_close(alphas, torch.tensor([0.5 - half_width, 0.5, 0.5 + half_width], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([5 / 18, 8 / 18, 5 / 18], dtype=torch.float64))


@pytest.mark.parametrize("n_steps", [1, 2, 5, 10, 16])
def test_gauss_legendre_integrates_polynomials_of_degree_2n_minus_1(n_steps):
    alphas, weights = quadrature("gauss-legendre", n_steps)
    for degree in range(2 * n_steps):
        assert float((weights * alphas**degree).sum()) == pytest.approx(1 / (degree + 1), rel=1e-12)
    if n_steps <= 5:  # degree 2N is no longer exact (for large N the miss is below float64 resolution)
        assert float((weights * alphas ** (2 * n_steps)).sum()) != pytest.approx(1 / (2 * n_steps + 1), rel=1e-12)


def test_riemann_right_is_the_reference_codes_rule():
    alphas, weights = quadrature("riemann-right", 4)
    assert alphas.tolist() == [1.0, 0.75, 0.5, 0.25]
    assert weights.tolist() == [0.25] * 4


def test_midpoint():
    alphas, weights = quadrature("midpoint", 4)
    assert alphas.tolist() == [0.125, 0.375, 0.625, 0.875]
    assert weights.tolist() == [0.25] * 4


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="unknown quadrature rule 'simpson'.*gauss-legendre"):
        quadrature("simpson", 4)
    with pytest.raises(ValueError, match="at least 1"):
        quadrature("midpoint", 0)


# --- the adaptive rule, on integrands whose integrals are known in closed form ------------------------------
# Input b, position s has the primitive F[b, s](a) = (tanh(k_b (a - c_s)), a^2 s): its derivative is the
# integrand, its integral over [0, 1] is F[b, s](1) - F[b, s](0), and the primitive of the integrand summed
# over positions is the sum of the F[b, s]. A large k_b is a sharp step inside the path.
CENTRES = torch.tensor([0.3, 0.55, 0.8], dtype=torch.float64)


def primitive_per_position(k: Tensor, alpha: Tensor) -> Tensor:
    """``(P, S, 2)`` for sharpness ``k`` ``(P,)`` at ``alpha`` ``(P,)``."""
    steps = torch.tanh(k[:, None] * (alpha[:, None] - CENTRES))
    ramps = alpha[:, None] ** 2 * torch.arange(len(CENTRES), dtype=torch.float64)
    return torch.stack([steps, ramps], dim=-1)


def integrand(k: Tensor, alpha: Tensor) -> Tensor:
    steps = k[:, None] / torch.cosh(k[:, None] * (alpha[:, None] - CENTRES)) ** 2
    ramps = 2 * alpha[:, None] * torch.arange(len(CENTRES), dtype=torch.float64)
    return torch.stack([steps, ramps], dim=-1)


def integrate(sharpness: list[float], **settings: object) -> tuple[PathIntegral, Tensor, list[int]]:
    """(the rule's result, the exact integrals, the number of integrand calls per batch of points)."""
    k = torch.tensor(sharpness, dtype=torch.float64)
    calls: list[int] = []

    def weighted_sum(item: Tensor, alpha: Tensor, weight: Tensor, slot: Tensor, n_slots: int) -> Tensor:
        calls.append(len(item))
        values = integrand(k[item], alpha) * weight[:, None, None]
        return torch.zeros(n_slots, len(CENTRES), 2, dtype=torch.float64).index_add_(0, slot, values)

    def primitive(item: Tensor, alpha: Tensor) -> Tensor:
        return primitive_per_position(k[item], alpha).sum(1)

    every = torch.arange(len(k))
    start, end = primitive(every, torch.zeros(len(k))), primitive(every, torch.ones(len(k)))
    exact = primitive_per_position(k, torch.ones(len(k))) - primitive_per_position(k, torch.zeros(len(k)))
    result = PathQuadrature(**settings).integrate(weighted_sum, primitive, start, end, panels_per_call=len(k))
    return result, exact, calls


def relative_total_errors(result: PathIntegral, exact: Tensor) -> Tensor:
    return (result.values.sum(1) - exact.sum(1)).norm(dim=-1) / exact.sum(1).norm(dim=-1)


def test_adaptive_rule_meets_the_tolerance_per_input_and_per_position():
    result, exact, _ = integrate([1.0, 40.0, 200.0], tolerance=1e-6, max_steps=1024)
    assert (relative_total_errors(result, exact) <= 1e-6).all()
    assert (result.n_nodes < 1024).all()  # met by refinement, not stopped by the cap
    # the check is on the sum over positions, but every position's integral is right too
    per_position = (result.values - exact).norm(dim=-1) / exact.sum(1).norm(dim=-1)[:, None]
    assert per_position.max() <= 1e-6
    # a smooth input takes the first two panels only; sharper ones take more
    assert result.n_nodes[0] == MIN_ADAPTIVE_STEPS
    assert result.n_nodes[0] < result.n_nodes[1] < result.n_nodes[2]


def test_adaptive_rule_spends_fewer_nodes_than_the_smallest_fixed_rule_that_is_as_accurate():
    # a fixed rule must take, for every input, the nodes its hardest input needs
    sharpness, tolerance = [1.0, 1.0, 10.0, 200.0], 1e-6
    adaptive, exact, _ = integrate(sharpness, tolerance=tolerance, max_steps=1024)
    assert (relative_total_errors(adaptive, exact) <= tolerance).all()
    needed = next(
        n for n in range(8, 2049, 8)
        if relative_total_errors(integrate(sharpness, n_steps=n)[0], exact).max().item() <= tolerance
    )
    assert adaptive.n_nodes.sum().item() * 3 < needed * len(sharpness)
    # and on the hardest input alone, placing nodes at the step beats spreading them over the path
    assert adaptive.n_nodes[-1].item() < needed


def test_a_cap_stops_refinement_of_that_input_only():
    result, exact, _ = integrate([1.0, 200.0], tolerance=1e-6, max_steps=48)
    assert result.n_nodes.tolist() == [MIN_ADAPTIVE_STEPS, 48]
    errors = relative_total_errors(result, exact)
    assert errors[0] <= 1e-6 < errors[1]


def test_an_input_gets_the_same_result_in_any_batch():
    alone, _, _ = integrate([200.0], tolerance=1e-7)
    batched, _, calls = integrate([1.0, 200.0, 40.0, 200.0], tolerance=1e-7)
    for row in (1, 3):
        torch.testing.assert_close(batched.values[row], alone.values[0], rtol=0, atol=1e-15)
        assert batched.n_nodes[row] == alone.n_nodes[0]
    # inputs that still need work share calls: far fewer calls than panels
    assert len(calls) < batched.n_nodes.sum().item() / PANEL_NODES / 2


def test_a_non_finite_integrand_is_not_refined_to_the_cap():
    result, _, _ = integrate([float("nan"), 1.0], tolerance=1e-6, max_steps=1024)
    assert result.n_nodes.tolist() == [MIN_ADAPTIVE_STEPS, MIN_ADAPTIVE_STEPS]
    assert torch.isnan(result.values[0, :, 0]).all() and torch.isfinite(result.values[1]).all()


def test_fixed_rule_spends_n_steps_in_one_call():
    result, exact, calls = integrate([1.0, 200.0], n_steps=12)
    assert result.n_nodes.tolist() == [12, 12] and calls == [24]
    nodes, weights = quadrature("gauss-legendre", 12)
    for row, k in enumerate([1.0, 200.0]):
        expected = (weights[:, None, None] * integrand(torch.full((12,), k, dtype=torch.float64), nodes)).sum(0)
        torch.testing.assert_close(result.values[row], expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tolerance": None}, "give a tolerance to adapt to"),
        ({"rule": "midpoint"}, "give n_steps with it"),
        ({"max_steps": 8}, "max_steps must be at least 16"),
        ({"tolerance": 0.0}, "between 0 and 1"),
        ({"n_steps": 0}, "n_steps must be a whole number from 1 to 1024, got 0"),
        ({"n_steps": 100_000}, "n_steps must be a whole number from 1 to 1024, got 100000"),
        ({"n_steps": True}, "n_steps must be a whole number from 1 to 1024, got True"),
        ({"max_steps": 10_000}, "max_steps must be a whole number from 1 to 4096"),
    ],
)
def test_bad_quadrature_settings(settings, message):
    with pytest.raises(ConfigError, match=message) as raised:
        PathQuadrature(**settings)
    assert raised.value.setting == next(iter(settings))  # the setting at fault, for the CLI to name


def test_rank_within_item_counts_earlier_masked_entries_of_the_same_item():
    item = torch.tensor([3, 1, 3, 3, 1, 2, 3])
    mask = torch.tensor([True, True, False, True, True, True, True])
    expected, seen = [], {}
    for i, m in zip(item.tolist(), mask.tolist()):
        expected.append(seen.get(i, 0) if m else 0)
        if m:
            seen[i] = seen.get(i, 0) + 1
    assert _rank_within_item(item, mask).tolist() == expected
