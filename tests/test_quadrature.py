"""Quadrature nodes and weights, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from xclip.core.quadrature import quadrature


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
