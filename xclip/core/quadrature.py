"""Quadrature on [0, 1] for the integrated Jacobian: fixed rules, and an adaptive rule that refines each input's
path until its completeness error meets a tolerance.

The adaptive rule uses what makes this integral special: the integrand ``f(a)`` (contributions, positions x
embedding) sums over positions to the derivative of a function we can evaluate, ``F(a) = g(r + a (x - r))``.
So on every panel ``[lo, hi]`` of the path the quadrature error of the summed integrand is known *exactly*: the
panel's completeness residual ``sum_s integral_panel f[s] - (F(hi) - F(lo))``. The residuals of an input's panels
add up to its completeness error, so an input is finished when that error, measured and not estimated, is within
the tolerance.

Each panel carries a nested Gauss-Patterson rule (3, 7, then 15 nodes, every rule keeping all nodes of the one
before), so refining a panel never throws evaluations away. Each round refines, for every unfinished input, the
panel furthest over its share: one level up, or, at 15 nodes, into two fresh 3-node halves. The integrand of a
trained model is rough in one narrow stretch of the path per tower; the first panels' breakpoints (per model when
calibrated, see :mod:`xclip.attribution.panels`) decide how quickly the refinement finds it.

Maps are checked too, since the sum over positions can cancel where the maps do not. A panel's last two nested
rules differ by ``D = E_prev - E``, their two errors; if the last rule shrank the error by a factor ``rho``
(``|E| = rho |E_prev|``), then ``|E| <= rho / (1 - rho) |D|``. In the sum over positions both errors are known
exactly, so ``rho`` is known there; the map's own ``rho`` is taken as the summed one times a safety factor
(:data:`MAP_SAFETY`, larger for the crude 1-to-3-node comparison), and a panel's map error bound is ``|D|``
times that, never more than ``|D|`` itself. The bounds of an input's panels add up (triangle inequality), plus the
rounding level, to its ``map_error``; an input is refined until that is within the tolerance relative to the
contributions' size. The safety factors were chosen on held-out scenes of the demo model and their coverage
measured on others (``scripts/map_error_coverage.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from numpy.polynomial import legendre
from torch import Tensor

from xclip.core.rules import (  # noqa: F401  (re-exported: the quadrature's settings)
    FIRST_LEVEL, TOP_LEVEL, BISECTION_NODES, DEFAULT_BREAKPOINTS, DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE, MAX_BREAKPOINTS, MAX_FIXED_NODES, MAX_NODES, MIN_ADAPTIVE_STEPS, PATTERSON_SIZES, ROUNDING_FLOOR, RULES, Rule, STORED_LEVELS, check_first_panels, check_quadrature,
)
from xclip.errors import ConfigError

# The adaptive rule's state (three partial sums of positions x embedding per panel) may take at most this much;
# larger batches are integrated in groups, which changes no result (an input's result does not depend on its batch).
MAX_STATE_BYTES = 2 << 30
# How much faster the map's error may shrink than the error of its sum over positions, by the level a panel is at:
# the map error bound of a panel is its last change times this factor times the sum's shrinking factor (at most the
# change). Measured per panel on demo-model scenes (seeds 31001-31002, never used for validation), the map's factor
# over the sum's was at most 2.9 between the 1- and 3-node rules and 1.5 above; the input bound adds its panels'
# bounds, which leaves further room. Coverage on other seeds: scripts/map_error_coverage.py.
MAP_SAFETY = (1.0, 4.0, 2.0, 2.0)

WeightedSum = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]
"""``(item, alpha, weights, slot, n_slots) -> (n_slots, W, S, E)``: per slot, and for each of the ``W`` columns of
``weights`` ``(P, W)``, the sum of ``weight * f_item(alpha)`` over the points (one entry per point) assigned to it."""
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
        # the paper's code's rule: alpha = 1, 1 - 1/N, ..., 1/N
        alphas = torch.arange(n_steps, 0, -1, dtype=torch.float64) / n_steps
        return alphas, torch.full((n_steps,), 1.0 / n_steps, dtype=torch.float64)
    if rule == "midpoint":
        alphas = (torch.arange(n_steps, dtype=torch.float64) + 0.5) / n_steps
        return alphas, torch.full((n_steps,), 1.0 / n_steps, dtype=torch.float64)
    msg = f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}"
    raise ValueError(msg)


@dataclass(frozen=True)
class NestedRules:
    """The nested Gauss-Patterson rules of :data:`PATTERSON_SIZES` on [0, 1].

    Attributes:
        nodes: ``(N,)`` every node of the largest rule, the smaller rules' nodes first.
        level: ``(N,)`` the smallest rule each node belongs to (an index into ``PATTERSON_SIZES``).
        weights: ``(N, L)`` each node's weight in each rule (0 in rules it does not belong to).
    """

    nodes: Tensor
    level: Tensor
    weights: Tensor


@functools.cache
def nested_rules() -> NestedRules:
    """Patterson's extensions, computed: each adds the zeros of the polynomial orthogonal, under the weight of the
    previous rule's node polynomial, to every polynomial of lower degree (Patterson, Math. Comp. 22, 1968)."""
    x, w = legendre.leggauss(96)
    nodes, levels = np.array([0.0]), [0]
    for level, size in enumerate(PATTERSON_SIZES[1:], start=1):
        n_new = size - len(nodes)
        node_polynomial = np.prod(x[:, None] - nodes[None, :], axis=1)
        basis = legendre.legvander(x, n_new)
        moments = (basis[:, :n_new].T * (w * node_polynomial)) @ basis
        coefficients = np.append(np.linalg.solve(moments[:, :n_new], -moments[:, n_new]), 1.0)
        new = np.sort(legendre.legroots(coefficients).real)
        nodes, levels = np.concatenate([nodes, new]), levels + [level] * n_new
    weights = np.zeros((len(nodes), len(PATTERSON_SIZES)))
    for level, size in enumerate(PATTERSON_SIZES):
        # the rule of `size` nodes is interpolatory: it integrates the first `size` Legendre polynomials exactly
        moments = np.zeros(size)
        moments[0] = 2.0
        weights[:size, level] = np.linalg.solve(legendre.legvander(nodes[:size], size - 1).T, moments)
    return NestedRules(
        nodes=torch.from_numpy((nodes + 1.0) / 2.0),
        level=torch.tensor(levels),
        weights=torch.from_numpy(weights / 2.0),
    )


def check_breakpoints(breakpoints: Sequence[float], setting: str = "breakpoints") -> tuple[float, ...]:
    """Interior panel edges, strictly increasing inside (0, 1).

    Raises:
        ConfigError: naming ``setting``.
    """
    values = tuple(breakpoints)
    is_numbers = all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in values)
    if not is_numbers or len(values) > MAX_BREAKPOINTS or not all(0 < b < 1 for b in values) or list(values) != sorted(set(values)):
        msg = (f"{setting} must be at most {MAX_BREAKPOINTS} increasing numbers strictly between 0 and 1 "
               f"(where the first panels of the path end), got {list(values)!r}")
        raise ConfigError(msg, setting=setting)
    return tuple(float(b) for b in values)


@dataclass(frozen=True)
class PathIntegral:
    """Integrals over [0, 1] of a batch of inputs' integrands.

    Attributes:
        values: ``(B, S, E)``.
        n_nodes: ``(B,)`` integrand evaluations spent on each input.
        n_endpoints: ``(B,)`` evaluations of the primitive alone (panel edges; no tangents), which cost a plain
            forward pass each.
        map_error: ``(B,)`` a bound on the Frobenius error of ``values``: the panels' bounds (see
            :func:`_map_error`) summed, plus the rounding level; NaN for fixed rules, which have no second rule to
            compare with.

    Whether an input met the tolerance is read off its final completeness error: a capped input can still be
    within it, and panels kept at the rounding level can add up to more than it.
    """

    values: Tensor
    n_nodes: Tensor
    n_endpoints: Tensor
    map_error: Tensor


@dataclass(frozen=True)
class PathQuadrature:
    """How the path integral is taken: a fixed rule with ``n_steps`` nodes, or (``n_steps=None``) nested
    Gauss-Patterson panels, starting at ``breakpoints``, refined until each input's relative completeness error is
    at most ``tolerance``, spending at most ``max_steps`` integrand evaluations on it.

    With a fixed rule, ``tolerance`` is not pursued; callers use it only to flag inputs that miss it (None: no
    check).
    """

    n_steps: int | None = None
    tolerance: float | None = DEFAULT_TOLERANCE
    max_steps: int = DEFAULT_MAX_STEPS
    rule: Rule = "gauss-legendre"
    breakpoints: tuple[float, ...] = DEFAULT_BREAKPOINTS

    def __post_init__(self) -> None:
        check_quadrature(n_steps=self.n_steps, tolerance=self.tolerance, max_steps=self.max_steps, rule=self.rule)
        object.__setattr__(self, "breakpoints", check_breakpoints(self.breakpoints))
        if self.is_adaptive:
            check_first_panels(self.max_steps, len(self.breakpoints) + 1)

    @property
    def is_adaptive(self) -> bool:
        return self.n_steps is None

    def integrate(
        self, weighted_sum: WeightedSum, primitive: Primitive, start: Tensor, end: Tensor, *, n_positions: int
    ) -> PathIntegral:
        """Integrate each input's integrand over [0, 1].

        Args:
            weighted_sum: evaluates the integrand at points and sums it into slots (see :data:`WeightedSum`).
            primitive: ``F`` at points of the path (adaptive rule only).
            start, end: ``F(0)`` and ``F(1)`` of every input, ``(B, E)``.
            n_positions: ``S``, for the adaptive rule's memory bound.
        """
        n_inputs = start.shape[0]
        if not self.is_adaptive:
            assert self.n_steps is not None
            return _integrate_fixed(weighted_sum, n_inputs, self.rule, self.n_steps, start.device)
        assert self.tolerance is not None
        per_input = state_bytes_per_input(n_positions, start.shape[1], start.element_size(), self.max_steps, len(self.breakpoints))
        group = max(1, MAX_STATE_BYTES // per_input)
        parts = [
            _integrate_nested(weighted_sum, primitive, start, end, inputs, self.tolerance, self.max_steps, self.breakpoints)
            for inputs in torch.arange(n_inputs, device=start.device).split(group)
        ]
        return PathIntegral(*(torch.cat(fields) for fields in zip(*(vars(p).values() for p in parts))))


def state_bytes_per_input(n_positions: int, embedding_dim: int, element_size: int, max_steps: int, n_breakpoints: int) -> int:
    """The most memory the adaptive rule's state takes per input: ``STORED_LEVELS`` partial sums of
    ``(S, E)`` per panel, and as many panels as bisections within ``max_steps`` can make."""
    first = n_breakpoints + 1
    most_panels = first + max(0, max_steps - first * PATTERSON_SIZES[FIRST_LEVEL]) // BISECTION_NODES
    return most_panels * STORED_LEVELS * n_positions * embedding_dim * element_size


def _integrate_fixed(weighted_sum: WeightedSum, n_inputs: int, rule: str, n_steps: int, device: torch.device) -> PathIntegral:
    alphas, weights = (t.to(device) for t in quadrature(rule, n_steps))
    item = torch.arange(n_inputs, device=device).repeat(n_steps)
    values = weighted_sum(item, alphas.repeat_interleave(n_inputs), weights.repeat_interleave(n_inputs)[:, None], item, n_inputs)
    zeros = torch.zeros(n_inputs, device=device)
    unknown = torch.full((n_inputs,), float("nan"), dtype=torch.float64, device=device)
    return PathIntegral(values[:, 0], torch.full((n_inputs,), n_steps, device=device), zeros.long(), unknown)


@dataclass
class _Panels:
    """Every input's panels, one row each: the input a panel belongs to (``item``), its interval ``[lo, hi]`` on
    the path, the primitive at both ends, the level of the rule it is at, its partial sums ``(P, STORED_LEVELS, S,
    E)`` at that level and those it may climb to, and the change between its last two rules (Frobenius norm per
    panel, and summed over positions). The tensors run in parallel: rows are selected, replaced and appended
    together, never one tensor alone."""

    item: Tensor
    lo: Tensor
    hi: Tensor
    primitive_lo: Tensor
    primitive_hi: Tensor
    level: Tensor
    sums: Tensor
    change: Tensor
    summed_change: Tensor

    def __getitem__(self, rows: Tensor | slice) -> _Panels:
        return _Panels(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def __len__(self) -> int:
        return len(self.item)

    def replace(self, rows: Tensor, panels: _Panels) -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(panels, f.name)

    def append(self, panels: _Panels) -> None:
        for f in fields(self):
            setattr(self, f.name, torch.cat([getattr(self, f.name), getattr(panels, f.name)]))


def _rule_change(sums: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The Frobenius norm ``(K,)`` of (rule ``upper``) - (rule ``upper - 1``) per panel, and that difference summed
    over positions ``(K, E)``; ``sums[:, k]`` holds rule ``k + offset``."""
    rows = torch.arange(len(sums), device=sums.device)
    offset = len(PATTERSON_SIZES) - sums.shape[1]
    difference = sums[rows, upper - offset] - sums[rows, upper - 1 - offset]
    return difference.flatten(1).norm(dim=-1), difference.sum(1)


def _first_level(item: Tensor, lo: Tensor, hi: Tensor, primitive_lo: Tensor, primitive_hi: Tensor, fresh: Tensor) -> _Panels:
    """New panels at the first level, from the sums ``fresh`` over all their nodes."""
    level = torch.full_like(item, FIRST_LEVEL)
    return _Panels(item, lo, hi, primitive_lo, primitive_hi, level, fresh[:, FIRST_LEVEL:], *_rule_change(fresh, level))


def _integrate_nested(
    weighted_sum: WeightedSum,
    primitive: Primitive,
    all_start: Tensor,
    all_end: Tensor,
    inputs: Tensor,
    tolerance: float,
    max_steps: int,
    breakpoints: tuple[float, ...],
) -> PathIntegral:
    """Nested Gauss-Patterson panels of the inputs ``inputs``, refined in rounds (see the module's docstring).

    Every round evaluates the new nodes of all inputs that still need work in one call. An input's choices depend
    on its own panels only, and its panels keep their order whatever else is in the batch, so its result does not
    depend on its batch. A refinement that would take an input past ``max_steps`` evaluations is not made.
    """
    device = all_start.device
    start, end = all_start[inputs], all_end[inputs]
    n_inputs = len(inputs)
    rules = nested_rules()
    rule_nodes, node_level, rule_weights = rules.nodes.to(device), rules.level.to(device), rules.weights.to(device)
    sizes = torch.tensor(PATTERSON_SIZES, device=device)

    def evaluate(panel_item: Tensor, lo: Tensor, hi: Tensor, after: Tensor, upto: Tensor) -> Tensor:
        """Partial sums ``(K, L, S, E)`` over each panel's nodes of levels ``after < level <= upto``."""
        is_new = (node_level > after[:, None]) & (node_level <= upto[:, None])  # (K, N)
        panel, node = torch.nonzero(is_new, as_tuple=True)
        width = hi[panel] - lo[panel]
        return weighted_sum(
            inputs[panel_item[panel]], lo[panel] + width * rule_nodes[node], width[:, None] * rule_weights[node], panel, len(lo)
        )

    edges = torch.tensor([0.0, *breakpoints, 1.0], dtype=torch.float64, device=device)
    n_first = len(edges) - 1
    at_edges = start[:, None].repeat(1, n_first + 1, 1)
    at_edges[:, -1] = end
    if n_first > 1:
        inner = primitive(inputs.repeat_interleave(n_first - 1), edges[1:-1].repeat(n_inputs))
        at_edges[:, 1:-1] = inner.reshape(n_inputs, n_first - 1, -1).to(start.dtype)
    item, lo, hi = torch.arange(n_inputs, device=device).repeat_interleave(n_first), edges[:-1].repeat(n_inputs), edges[1:].repeat(n_inputs)
    fresh = evaluate(item, lo, hi, torch.full_like(item, -1), torch.full_like(item, FIRST_LEVEL))
    panels = _first_level(item, lo, hi, at_edges[:, :-1].flatten(0, 1).clone(),
                        at_edges[:, 1:].flatten(0, 1).clone(), fresh)  # no views: a panel's end is the next one's start
    n_nodes = torch.full((n_inputs,), n_first * PATTERSON_SIZES[FIRST_LEVEL], device=device)
    n_endpoints = torch.full((n_inputs,), n_first - 1, device=device)
    allowed = tolerance * (end - start).norm(dim=-1)
    eps = torch.finfo(panels.sums.dtype).eps
    while True:
        item, level = panels.item, panels.level
        rows = torch.arange(len(panels), device=device)
        current = panels.sums[rows, level - FIRST_LEVEL]
        residual_vector = current.sum(1) - (panels.primitive_hi - panels.primitive_lo).to(current.dtype)
        residual = residual_vector.norm(dim=-1)
        error = torch.zeros_like(start).index_add_(0, item, residual_vector.to(start.dtype)).norm(dim=-1)
        values = torch.zeros((n_inputs, *current.shape[1:]), dtype=current.dtype, device=device).index_add_(0, item, current)
        # the sum's error at the rule before the last, exactly: the last rule's minus the change between them
        previous_residual = (residual_vector - panels.summed_change.to(residual_vector.dtype)).norm(dim=-1)
        map_error = _map_error(panels.change, residual, previous_residual, level)
        values_norm = values.flatten(1).norm(dim=-1).double()
        # below the rounding of the accumulated values no error can be certified
        input_map_error = ROUNDING_FLOOR * eps * values_norm
        input_map_error = input_map_error.index_add_(0, item, map_error.double())
        map_allowed = tolerance * values_norm
        is_open = (error > allowed) | (input_map_error > map_allowed)
        is_open &= torch.isfinite(error)  # a non-finite integrand cannot be repaired by refining
        # refining cannot help a panel whose residual and map error are down at the rounding of what they measure
        rounding = ROUNDING_FLOOR * eps * (panels.primitive_lo.norm(dim=-1) + panels.primitive_hi.norm(dim=-1)).to(residual.dtype)
        map_rounding = ROUNDING_FLOOR * eps * current.flatten(1).norm(dim=-1)
        is_improvable = (residual > rounding) | (map_error > map_rounding)
        cost = torch.where(level < TOP_LEVEL, sizes[(level + 1).clamp(max=TOP_LEVEL)] - sizes[level], BISECTION_NODES)
        is_candidate = is_open[item] & is_improvable & (n_nodes[item] + cost <= max_steps)
        if not bool(is_candidate.any()):  # the state is final: values and map errors are this round's
            return PathIntegral(values, n_nodes, n_endpoints, input_map_error)
        # per input, the candidate furthest over its share of either allowance (the first such panel on a tie)
        score = torch.maximum(residual / allowed[item], map_error / map_allowed[item].to(map_error.dtype))
        score = torch.where(is_candidate, score, -1.0)
        best = torch.full((n_inputs,), -1.0, dtype=score.dtype, device=device).scatter_reduce(0, item, score, "amax")
        is_best = is_candidate & (score == best[item])
        first = torch.full((n_inputs,), len(item), device=device).scatter_reduce(0, item[is_best], rows[is_best], "amin")
        chosen = first[first < len(item)]
        n_nodes.index_add_(0, item[chosen], cost[chosen])

        extended, halved = chosen[level[chosen] < TOP_LEVEL], chosen[level[chosen] == TOP_LEVEL]
        # a panel below the top rule climbs one level (only the new level's nodes are evaluated); one at the top rule
        # is halved. Both in one call: the model sees one batch per round
        grown, parent = panels[extended], panels[halved]
        middle = (parent.lo + parent.hi) / 2
        primitive_middle = primitive(inputs[parent.item], middle).to(parent.primitive_lo.dtype) if len(halved) else parent.primitive_lo
        n_endpoints.index_add_(0, parent.item, torch.ones_like(halved))
        child_item, child_lo, child_hi = torch.cat([parent.item, parent.item]), torch.cat([parent.lo, middle]), torch.cat([middle, parent.hi])
        new = evaluate(
            torch.cat([grown.item, child_item]),
            torch.cat([grown.lo, child_lo]),
            torch.cat([grown.hi, child_hi]),
            torch.cat([grown.level, torch.full_like(child_item, -1)]),
            torch.cat([grown.level + 1, torch.full_like(child_item, FIRST_LEVEL)]),
        )
        grown.level += 1
        grown.sums += new[: len(grown), FIRST_LEVEL:]
        grown.change, grown.summed_change = _rule_change(grown.sums, grown.level)
        panels.replace(extended, grown)
        # the left half takes its parent's place, the right half goes to the end: an input's panels keep their order
        halves = _first_level(child_item, child_lo, child_hi, torch.cat([parent.primitive_lo, primitive_middle]),
                             torch.cat([primitive_middle, parent.primitive_hi]), new[len(grown) :])
        panels.replace(halved, halves[: len(halved)])
        panels.append(halves[len(halved) :])


def _map_error(change: Tensor, residual: Tensor, previous_residual: Tensor, level: Tensor) -> Tensor:
    """Each panel's map error bound: the change between its last two rules times how much the last rule shrank the
    error, as measured exactly in the sum over positions (``residual / previous_residual``) and widened by
    :data:`MAP_SAFETY`; never more than the change itself (which bounds the last rule's error whenever that rule
    at least halves the error of the one before)."""
    safety = torch.tensor(MAP_SAFETY, dtype=change.dtype, device=change.device)[level]
    shrink = (safety * residual.to(change.dtype) / previous_residual.to(change.dtype)).nan_to_num(1.0)
    return change * shrink.clamp(max=1.0)
