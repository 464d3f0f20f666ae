"""Quadrature rules on [0, 1] for the integrated Jacobian."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

Rule = Literal["gauss-legendre", "riemann-right", "midpoint"]
RULES: tuple[str, ...] = get_args(Rule)


def quadrature(rule: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of a rule on [0, 1], in float64.

    Returns:
        ``(alphas, weights)``, each of shape ``(n_steps,)``; the weights sum to 1.

    Raises:
        ValueError: unknown rule or ``n_steps < 1``.
    """
    if n_steps < 1:
        msg = f"n_steps must be at least 1, got {n_steps}"
        raise ValueError(msg)
    if rule == "gauss-legendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        # leggauss integrates over [-1, 1]; map to [0, 1]
        return torch.from_numpy((nodes + 1.0) / 2.0), torch.from_numpy(weights / 2.0)
    if rule == "riemann-right":
        # the reference implementation's rule: alpha = 1, 1 - 1/N, ..., 1/N
        alphas = torch.arange(n_steps, 0, -1, dtype=torch.float64) / n_steps
        return alphas, torch.full((n_steps,), 1.0 / n_steps, dtype=torch.float64)
    if rule == "midpoint":
        alphas = (torch.arange(n_steps, dtype=torch.float64) + 0.5) / n_steps
        return alphas, torch.full((n_steps,), 1.0 / n_steps, dtype=torch.float64)
    msg = f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}"
    raise ValueError(msg)
