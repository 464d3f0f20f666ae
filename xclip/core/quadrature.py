"""Quadrature on [0, 1] for the integrated Jacobian: fixed rules, and an adaptive rule that refines each input's
path until its completeness error meets a tolerance.

The adaptive rule uses what makes this integral special: the integrand ``f(a)`` (contributions, positions x
embedding) sums over positions to the derivative of a function we can evaluate, ``F(a) = g(r + a (x - r))``.
So on every panel ``[lo, hi]`` of the path the quadrature error of the summed integrand is known *exactly*:
``|sum_s integral_panel f[s] - (F(hi) - F(lo))|``, the panel's completeness residual. A panel whose residual is
within its share of the tolerance (``tolerance * |F(1) - F(0)| * (hi - lo)``) is kept; any other is bisected.
When every panel is kept, the residuals add up to at most ``tolerance * |F(1) - F(0)|``, so the input's
relative completeness error is within the tolerance. No error *estimate* is involved. (A panel whose residual is
down at the rounding level of ``F`` is kept too: bisecting it cannot help.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from xclip.errors import ConfigError

Rule = Literal["gauss-legendre", "riemann-right", "midpoint"]
RULES: tuple[str, ...] = get_args(Rule)

DEFAULT_TOLERANCE = 1e-3
DEFAULT_MAX_STEPS = 256
# Each panel is an 8-node Gauss-Legendre rule and the path starts as two panels. On the twelve demo scenes
# (float64, tolerance 1e-3) two first panels took fewer evaluations than one at every panel size; per caption
# and image, 6 and 8 nodes took the fewest (77 and 82; 4 nodes 79, 10 nodes 87, 16 nodes 94), and 8 kept the
# worst image error lower (2.0e-4 against 2.7e-4).
PANEL_NODES = 8
FIRST_PANELS = 2
MIN_ADAPTIVE_STEPS = PANEL_NODES * FIRST_PANELS
# A panel's residual cannot be measured below the rounding of F at its ends; in float32 on the demo model it
# stayed under 13 eps |F| on panels a 64th of the path wide. Panels at this level are not bisected further.
ROUNDING_FLOOR = 32
# The most nodes one input may take: far past any useful accuracy (the float32 floor is reached within 64 nodes on
# the demo model). A fixed Gauss-Legendre rule of N nodes solves an N x N eigenproblem for its nodes (N = 4096:
# 134 MB and 4 s; N = 100000, a typo, would take 75 GiB), so fixed rules stop at 1024 nodes (0.1 s).
MAX_NODES = 4096
MAX_FIXED_NODES = 1024

WeightedSum = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]
"""``(item, alpha, weight, slot, n_slots) -> (n_slots, S, E)``: per slot, the sum of ``weight * f_item(alpha)``
over the points (one entry of each argument per point) assigned to it."""
Primitive = Callable[[Tensor, Tensor], Tensor]
"""``(item, alpha) -> (K, E)``: ``F_item(alpha)``, whose derivative is ``f_item(alpha)`` summed over positions."""


def quadrature(rule: str, n_steps: int) -> tuple[Tensor, Tensor]:
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


@dataclass(frozen=True)
class PathIntegral:
    """Integrals over [0, 1] of a batch of inputs' integrands.

    Attributes:
        values: ``(B, S, E)``.
        n_nodes: ``(B,)`` integrand evaluations spent on each input (refined-away panels included).

    Whether an input met the tolerance is read off its final completeness error: a capped input can still be
    within it, and panels kept at the rounding level can add up to more than it.
    """

    values: Tensor
    n_nodes: Tensor


def check_quadrature(*, n_steps: int | None, tolerance: float | None, max_steps: int, rule: str,
                     convention: str = "exact") -> None:
    """The one check of the quadrature settings (the API, the config and :class:`PathQuadrature` use it).

    Raises:
        ConfigError: naming the setting at fault in its ``setting`` field.
    """
    if rule not in RULES:
        msg = f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}"
        raise ConfigError(msg, setting="rule")
    for name, value, most in (("n_steps", n_steps, MAX_FIXED_NODES), ("max_steps", max_steps, MAX_NODES)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
            msg = f"{name} must be a whole number from 1 to {most}, got {value!r}"
            raise ConfigError(msg, setting=name)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1):
        msg = f"tolerance must lie between 0 and 1 (a relative completeness error), got {tolerance!r}"
        raise ConfigError(msg, setting="tolerance")
    if n_steps is not None:
        return
    if convention == "reference":
        msg = ("convention 'reference' reproduces the reference code's fixed rule: give n_steps (its maps do not sum "
               "to the four-term value, so there is no tolerance to refine to)")
        raise ConfigError(msg, setting="convention")
    if tolerance is None:
        msg = "tolerance is not set and neither is n_steps: give a tolerance to adapt to, or n_steps for a fixed rule"
        raise ConfigError(msg, setting="tolerance")
    if rule != "gauss-legendre":
        msg = f"rule {rule!r} is for fixed-step comparisons: give n_steps with it (the adaptive rule is composite Gauss-Legendre)"
        raise ConfigError(msg, setting="rule")
    if max_steps < MIN_ADAPTIVE_STEPS:
        msg = f"max_steps must be at least {MIN_ADAPTIVE_STEPS} (the first {FIRST_PANELS} panels of {PANEL_NODES} nodes), got {max_steps}"
        raise ConfigError(msg, setting="max_steps")


@dataclass(frozen=True)
class PathQuadrature:
    """How the path integral is taken: a fixed rule with ``n_steps`` nodes, or (``n_steps=None``) composite
    Gauss-Legendre refined until each input's relative completeness error is at most ``tolerance``, spending
    at most ``max_steps`` integrand evaluations on it.

    With a fixed rule, ``tolerance`` is not pursued; callers use it only to flag inputs that miss it (None: no
    check).
    """

    n_steps: int | None = None
    tolerance: float | None = DEFAULT_TOLERANCE
    max_steps: int = DEFAULT_MAX_STEPS
    rule: Rule = "gauss-legendre"

    def __post_init__(self) -> None:
        check_quadrature(n_steps=self.n_steps, tolerance=self.tolerance, max_steps=self.max_steps, rule=self.rule)

    @property
    def is_adaptive(self) -> bool:
        return self.n_steps is None

    def integrate(
        self, weighted_sum: WeightedSum, primitive: Primitive, start: Tensor, end: Tensor, *, panels_per_call: int
    ) -> PathIntegral:
        """Integrate each input's integrand over [0, 1].

        Args:
            weighted_sum: evaluates the integrand at points and sums it into slots (see :data:`WeightedSum`).
            primitive: ``F`` at points of the path (adaptive rule only).
            start, end: ``F(0)`` and ``F(1)`` of every input, ``(B, E)``.
            panels_per_call: panels the adaptive rule evaluates at once (bounds its ``(panels, S, E)`` buffer).
        """
        if not self.is_adaptive:
            assert self.n_steps is not None
            return _integrate_fixed(weighted_sum, start.shape[0], self.rule, self.n_steps, start.device)
        assert self.tolerance is not None
        return _integrate_adaptive(
            weighted_sum, primitive, start, end, self.tolerance, self.max_steps, max(1, panels_per_call)
        )


def _integrate_fixed(weighted_sum: WeightedSum, n_inputs: int, rule: str, n_steps: int, device: torch.device) -> PathIntegral:
    alphas, weights = (t.to(device) for t in quadrature(rule, n_steps))
    item = torch.arange(n_inputs, device=device).repeat(n_steps)
    values = weighted_sum(item, alphas.repeat_interleave(n_inputs), weights.repeat_interleave(n_inputs), item, n_inputs)
    return PathIntegral(values, torch.full((n_inputs,), n_steps, device=device))


@dataclass(frozen=True)
class _Panels:
    """A queue of path panels ``[lo, hi]`` of inputs ``item``, with the primitive at both ends."""

    item: Tensor
    lo: Tensor
    hi: Tensor
    primitive_lo: Tensor
    primitive_hi: Tensor

    def __len__(self) -> int:
        return len(self.item)

    def split(self, n: int) -> tuple[_Panels, _Panels]:
        fields = vars(self).values()
        return _Panels(*(t[:n] for t in fields)), _Panels(*(t[n:] for t in fields))

    def select(self, mask: Tensor) -> _Panels:
        return _Panels(*(t[mask] for t in vars(self).values()))

    def __add__(self, other: _Panels) -> _Panels:
        return _Panels(*(torch.cat([a, b]) for a, b in zip(vars(self).values(), vars(other).values())))


def _integrate_adaptive(
    weighted_sum: WeightedSum,
    primitive: Primitive,
    start: Tensor,
    end: Tensor,
    tolerance: float,
    max_steps: int,
    panels_per_call: int,
) -> PathIntegral:
    """Composite Gauss-Legendre, bisecting panels whose completeness residual exceeds their share.

    Panels of all inputs wait in one first-in-first-out queue and are evaluated ``panels_per_call`` at a time,
    so inputs that still need work share every call. An input's panels keep their order in the queue whatever
    else is in it, so its result does not depend on its batch. A bisection that would take an input past
    ``max_steps`` evaluations is not made: the panel is kept as it is.
    """
    device, n_inputs = start.device, start.shape[0]
    nodes, weights = (t.to(device) for t in quadrature("gauss-legendre", PANEL_NODES))
    allowed_per_length = tolerance * (end - start).norm(dim=-1)  # (B,)

    edges = torch.linspace(0, 1, FIRST_PANELS + 1, dtype=torch.float64, device=device)
    inputs = torch.arange(n_inputs, device=device)
    inner = primitive(inputs.repeat_interleave(FIRST_PANELS - 1), edges[1:-1].repeat(n_inputs))
    at_edges = torch.cat([start[:, None], inner.reshape(n_inputs, FIRST_PANELS - 1, -1).to(start.dtype), end[:, None]], 1)
    queue = _Panels(
        item=inputs.repeat_interleave(FIRST_PANELS),
        lo=edges[:-1].repeat(n_inputs),
        hi=edges[1:].repeat(n_inputs),
        primitive_lo=at_edges[:, :-1].flatten(0, 1),
        primitive_hi=at_edges[:, 1:].flatten(0, 1),
    )
    committed = torch.full((n_inputs,), MIN_ADAPTIVE_STEPS, device=device)  # evaluations done or queued
    n_nodes = torch.zeros(n_inputs, dtype=torch.long, device=device)
    values: Tensor | None = None
    while len(queue):
        panels, queue = queue.split(panels_per_call)
        n_panels = len(panels)
        width = panels.hi - panels.lo
        integral = weighted_sum(
            panels.item.repeat_interleave(PANEL_NODES),
            (panels.lo[:, None] + width[:, None] * nodes).flatten(),
            (width[:, None] * weights).flatten(),
            torch.arange(n_panels, device=device).repeat_interleave(PANEL_NODES),
            n_panels,
        )
        n_nodes.index_add_(0, panels.item, torch.full_like(panels.item, PANEL_NODES))
        expected = (panels.primitive_hi - panels.primitive_lo).to(integral.dtype)
        residual = (integral.sum(1) - expected).norm(dim=-1)
        rounding = ROUNDING_FLOOR * torch.finfo(integral.dtype).eps * (
            panels.primitive_lo.norm(dim=-1) + panels.primitive_hi.norm(dim=-1)
        )
        is_accurate = residual <= torch.maximum(allowed_per_length[panels.item] * width, rounding.to(residual.dtype))
        is_accurate |= ~torch.isfinite(residual)  # bisection cannot repair a non-finite integrand; callers see it
        # bisect inaccurate panels while their input's budget lasts, earlier panels first
        cost = 2 * PANEL_NODES * (_rank_within_item(panels.item, ~is_accurate) + 1)
        is_refined = ~is_accurate & (committed[panels.item] + cost <= max_steps)
        committed.index_add_(0, panels.item[is_refined], torch.full_like(panels.item[is_refined], 2 * PANEL_NODES))
        is_kept = ~is_refined
        if values is None:
            values = torch.zeros((n_inputs, *integral.shape[1:]), dtype=integral.dtype, device=device)
        values.index_add_(0, panels.item[is_kept], integral[is_kept])
        if bool(is_refined.any()):
            queue = queue + _bisect(panels.select(is_refined), primitive)
    assert values is not None
    return PathIntegral(values, n_nodes)


def _bisect(panels: _Panels, primitive: Primitive) -> _Panels:
    """Both halves of every panel, each parent's left half right before its right half."""
    middle = (panels.lo + panels.hi) / 2
    at_middle = primitive(panels.item, middle).to(panels.primitive_lo.dtype)

    def interleave(left: Tensor, right: Tensor) -> Tensor:
        return torch.stack([left, right], dim=1).flatten(0, 1)

    return _Panels(
        item=interleave(panels.item, panels.item),
        lo=interleave(panels.lo, middle),
        hi=interleave(middle, panels.hi),
        primitive_lo=interleave(panels.primitive_lo, at_middle),
        primitive_hi=interleave(at_middle, panels.primitive_hi),
    )


def _rank_within_item(item: Tensor, mask: Tensor) -> Tensor:
    """For each masked entry, how many masked entries of the same item come before it (0 elsewhere)."""
    rank = torch.zeros_like(item)
    index = torch.nonzero(mask).flatten()
    if len(index) == 0:
        return rank
    order = torch.sort(item[index], stable=True).indices
    _, counts = torch.unique_consecutive(item[index][order], return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank[index[order]] = torch.arange(len(index), device=item.device) - group_start.repeat_interleave(counts)
    return rank
