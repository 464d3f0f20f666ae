"""Quadrature nodes and weights, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from numpy.polynomial import legendre
from torch import Tensor

from xclip.core.quadrature import (
    MIN_ADAPTIVE_STEPS,
    PATTERSON_SIZES,
    PathIntegral,
    PathQuadrature,
    nested_rules,
    quadrature,
    state_bytes_per_input,
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


def test_riemann_right_is_the_paper_codes_rule():
    alphas, weights = quadrature("riemann-right", 4)
    assert alphas.tolist() == [1.0, 0.75, 0.5, 0.25]
    assert weights.tolist() == [0.25] * 4


def test_midpoint():
    alphas, weights = quadrature("midpoint", 4)
    assert alphas.tolist() == [0.125, 0.375, 0.625, 0.875]
    assert weights.tolist() == [0.25] * 4


def test_patterson_rules_nest_and_match_the_published_nodes():
    rules = nested_rules()
    # each rule keeps every node of the one before: the first 1, 3, 7 nodes are the smaller rules
    assert rules.level.tolist() == [0, 1, 1, 2, 2, 2, 2] + [3] * 8
    on_minus_one_to_one = sorted(float(2 * x - 1) for x in rules.nodes[:7])
    published = [0.960491268708020283, 0.774596669241483377, 0.434243749346802558]  # Patterson (1968), 7 nodes
    assert on_minus_one_to_one == pytest.approx([-p for p in published] + [0.0] + published[::-1], abs=1e-14)
    assert (rules.weights >= 0).all()
    for level, size in enumerate(PATTERSON_SIZES):
        assert (rules.weights[size:, level] == 0).all() and (rules.weights[:size, level] > 0).all()


@pytest.mark.parametrize(("level", "degree"), [(0, 1), (1, 5), (2, 11), (3, 23)])
def test_patterson_rules_integrate_polynomials_up_to_their_degree_and_no_further(level, degree):
    rules = nested_rules()
    weights = rules.weights[:, level]
    for d in range(degree + 1):
        assert float((weights * rules.nodes**d).sum()) == pytest.approx(1 / (d + 1), rel=1e-12)
    # the Legendre polynomial of the next degree integrates to 0; monomials hide the miss below float64 resolution
    next_legendre = torch.from_numpy(legendre.legval(2 * rules.nodes.numpy() - 1, [0] * (degree + 1) + [1]))
    assert abs(float((weights * next_legendre).sum())) > 1e-3


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

    def weighted_sum(item: Tensor, alpha: Tensor, weights: Tensor, slot: Tensor, n_slots: int) -> Tensor:
        calls.append(len(item))
        values = integrand(k[item], alpha)[:, None] * weights[:, :, None, None]
        return torch.zeros(n_slots, weights.shape[1], len(CENTRES), 2, dtype=torch.float64).index_add_(0, slot, values)

    def primitive(item: Tensor, alpha: Tensor) -> Tensor:
        return primitive_per_position(k[item], alpha).sum(1)

    every = torch.arange(len(k))
    start, end = primitive(every, torch.zeros(len(k))), primitive(every, torch.ones(len(k)))
    exact = primitive_per_position(k, torch.ones(len(k))) - primitive_per_position(k, torch.zeros(len(k)))
    result = PathQuadrature(**settings).integrate(weighted_sum, primitive, start, end, n_positions=len(CENTRES))
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
    # a smooth input takes the first panels' first rule only; sharper ones take more
    assert result.n_nodes[0] == MIN_ADAPTIVE_STEPS
    assert result.n_nodes[0] < result.n_nodes[1] < result.n_nodes[2]


@pytest.mark.slow  # every fixed rule up to 2048 nodes: tens of seconds on busy CPUs
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
    assert result.n_nodes[0] == MIN_ADAPTIVE_STEPS and 48 - 8 < result.n_nodes[1] <= 48  # no refinement fits after
    errors = relative_total_errors(result, exact)
    assert errors[0] <= 1e-6 < errors[1]


def test_an_input_gets_the_same_result_in_any_batch():
    alone, _, _ = integrate([200.0], tolerance=1e-7)
    batched, _, calls = integrate([1.0, 200.0, 40.0, 200.0], tolerance=1e-7)
    for row in (1, 3):
        torch.testing.assert_close(batched.values[row], alone.values[0], rtol=0, atol=1e-15)
        assert batched.n_nodes[row] == alone.n_nodes[0]
    # inputs that still need work share calls: every call adds at least 4 nodes to each input it refines, so
    # one input's worth of calls serves the whole batch
    assert len(calls) <= 1 + (batched.n_nodes.max().item() - MIN_ADAPTIVE_STEPS) / 4


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
        ({"max_steps": 8}, "max_steps must be at least 12"),
        ({"breakpoints": (0.5, 0.2)}, "increasing numbers strictly between 0 and 1"),
        ({"breakpoints": (0.0, 0.5)}, "increasing numbers strictly between 0 and 1"),
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


def test_sums_that_cancel_over_positions_are_refined_by_the_map_estimate():
    # in dimension 0, positions 0 and 1 hold a sharp step and its negative: their sum is zero at every node, so
    # the completeness residual is zero however wrong each position's integral is. Dimension 1 is a constant 1 at
    # position 0 (F(a) = (0, a)), which every rule integrates exactly.
    k = 200.0

    def per_position(alpha: Tensor) -> Tensor:
        step = k / torch.cosh(k * (alpha - 0.55)) ** 2
        ones, zeros = torch.ones_like(alpha), torch.zeros_like(alpha)
        return torch.stack([torch.stack([step, ones], 1), torch.stack([-step, zeros], 1)], dim=1)  # (P, 2, 2)

    def weighted_sum(item: Tensor, alpha: Tensor, weights: Tensor, slot: Tensor, n_slots: int) -> Tensor:
        values = per_position(alpha)[:, None] * weights[:, :, None, None]
        return torch.zeros(n_slots, weights.shape[1], 2, 2, dtype=torch.float64).index_add_(0, slot, values)

    def primitive(item: Tensor, alpha: Tensor) -> Tensor:
        return torch.stack([torch.zeros_like(alpha), alpha], dim=1)

    start, end = primitive(torch.zeros(1), torch.zeros(1)), primitive(torch.zeros(1), torch.ones(1))
    result = PathQuadrature(tolerance=1e-6, max_steps=1024).integrate(weighted_sum, primitive, start, end, n_positions=2)
    step = math.tanh(k * 0.45) - math.tanh(-k * 0.55)
    exact = torch.tensor([[step, 1.0], [-step, 0.0]], dtype=torch.float64)
    error = float((result.values[0] - exact).norm() / exact.norm())
    assert result.n_nodes[0] > 5 * MIN_ADAPTIVE_STEPS  # refined though the completeness residual was always zero
    assert error <= 1e-6
    # the bound is what stopped it, and it holds
    relative_bound = float(result.map_error[0] / result.values[0].norm())
    assert error <= relative_bound <= 1e-6


def test_the_map_error_bound_holds_and_is_not_loose():
    result, exact, _ = integrate([1.0, 40.0, 200.0], tolerance=1e-4, max_steps=1024)
    true = (result.values - exact).flatten(1).norm(dim=-1) / exact.flatten(1).norm(dim=-1)
    bound = result.map_error / result.values.flatten(1).norm(dim=-1)
    assert (true <= bound).all() and (bound <= 1e-4).all()
    sharp = slice(1, 3)  # the smooth input converges at the rounding level, where a ratio says nothing
    ratio = bound[sharp] / true[sharp]
    assert ((ratio >= 1) & (ratio < 100)).all(), ratio


def test_a_fixed_rule_reports_no_map_error_bound():
    result, _, _ = integrate([40.0], n_steps=10)
    assert torch.isnan(result.map_error).all()  # unknown, never a reassuring 0


def test_the_first_panels_follow_the_breakpoints():
    # a step at 0.55 is found at once when a narrow panel sits around it
    even, exact, _ = integrate([200.0], tolerance=1e-6, max_steps=1024)
    around = integrate([200.0], tolerance=1e-6, max_steps=1024, breakpoints=(0.25, 0.5, 0.6, 0.75))[0]
    assert relative_total_errors(around, exact) <= 1e-6
    assert around.n_nodes[0] < even.n_nodes[0]


def test_state_memory_is_bounded_and_stated():
    # ViT-B/16 image tower at the defaults: 197 positions x 512 dimensions in float32, 44 panels of three sums
    per_input = state_bytes_per_input(197, 512, 4, 256, 3)
    assert 50e6 < per_input < 60e6  # docs/method.md's 54 MB
    # the bound holds the panels a refinement can make: each split adds one panel and one panel edge, so an
    # input that splits all it can ends with 1 + n_endpoints panels, no more than the bound counts
    for max_steps in (30, 64, 256):
        result, _, _ = integrate([1e4], tolerance=1e-12, max_steps=max_steps)
        panels = 1 + int(result.n_endpoints[0])
        assert panels > 4  # it did split
        assert panels * 3 * len(CENTRES) * 2 * 8 <= state_bytes_per_input(len(CENTRES), 2, 8, max_steps, 3)


def test_a_batch_over_the_memory_bound_is_integrated_in_groups_with_the_same_results(monkeypatch):
    import xclip.core.quadrature as quadrature_module

    together, _, calls_together = integrate([1.0, 200.0, 40.0, 200.0], tolerance=1e-7)
    one_input = state_bytes_per_input(len(CENTRES), 2, 8, 256, 3)
    monkeypatch.setattr(quadrature_module, "MAX_STATE_BYTES", 2 * one_input)  # two inputs per group
    grouped, _, calls_grouped = integrate([1.0, 200.0, 40.0, 200.0], tolerance=1e-7)
    torch.testing.assert_close(grouped.values, together.values, rtol=0, atol=1e-15)
    assert grouped.n_nodes.tolist() == together.n_nodes.tolist()
    assert len(calls_grouped) > len(calls_together)  # the groups ran one after the other
