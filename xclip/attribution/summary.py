"""What a pair's map says, in a few numbers per caption token: where each token's mass sits on the image.

A run that keeps no contributions (``output.contributions: none``) stores these instead of maps; a run that keeps
them computes the same facts from a pair's map (:meth:`xclip.store.reader.RunReader.pair_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class TokenSummary:
    """One pair's facts per caption position; arrays of length ``n`` (the caption's own positions).

    Attributes:
        values: the token's share of the map: the sum of its row over every image position (prefix and patches).
        peak_patch: index (0..n_patches-1, row-major on the grid) of the patch with the largest value in the row;
            -1 where the row is 0 on every patch (BOS, whose contributions are zero).
        peak_value: that value (NaN without a peak).
        top_share: the positive mass in the token's ``top_patches`` largest patches over its positive mass on all
            patches (NaN where the row has no positive mass on patches).
        entropy: entropy of the row's positive mass over patches divided by ``log(n_patches)``: 0 on one patch,
            1 spread evenly (NaN without positive mass).
        centroid: ``(n, 2)`` positive-mass-weighted mean (row, column) of patch centres, in [0, 1] of the grid
            (centre of patch (r, c): ``((r + 0.5) / rows, (c + 0.5) / cols)``); NaN without positive mass.
        spread: positive-mass-weighted RMS distance of patch centres from the centroid, same units (NaN without
            positive mass).
    """

    values: np.ndarray
    peak_patch: np.ndarray
    peak_value: np.ndarray
    top_share: np.ndarray
    entropy: np.ndarray
    centroid: np.ndarray
    spread: np.ndarray


@dataclass(frozen=True)
class PairSummary:
    """One pair's map in brief: its tokens' facts and its largest cells.

    Attributes:
        token: per caption position, see :class:`TokenSummary`.
        top_cells: ``(k,)`` flat indices ``t * S + s`` into the ``n x S`` map (``S``: prefix + patches), by value,
            largest first; ``k`` is the run's ``top_cells`` or the map's size if smaller.
        top_cell_values: ``(k,)`` their values.
    """

    token: TokenSummary
    top_cells: np.ndarray
    top_cell_values: np.ndarray


@dataclass(frozen=True)
class PairSummaries:
    """:class:`PairSummary` of ``P`` pairs as padded arrays (what a run file stores).

    ``token``'s arrays are ``(P, L)`` (``centroid``: ``(P, L, 2)``) with ``L`` the longest caption's positions;
    rows past a pair's ``n_positions`` are NaN (``peak_patch``: -1). Cell arrays are ``(P, k)``; cells past a
    map's size are -1 / NaN.
    """

    n_positions: np.ndarray
    token: TokenSummary
    top_cells: np.ndarray
    top_cell_values: np.ndarray

    def __len__(self) -> int:
        return len(self.n_positions)

    def rows(self, k: int) -> dict[str, np.ndarray]:
        """The ``k``-th pair's padded arrays by name (:data:`TOKEN_ARRAYS`, then ``top_cells`` and ``top_cell_values``): what a run file stores of it."""
        return {**{name: getattr(self.token, name)[k] for name in TOKEN_ARRAYS},
                "top_cells": self.top_cells[k], "top_cell_values": self.top_cell_values[k]}

    def pair(self, k: int) -> PairSummary:
        """The ``k``-th pair's summary, cut to its own positions and cells."""
        return pair_summary_from_rows(int(self.n_positions[k]), self.rows(k))


# a pair's arrays: per caption position (TokenSummary's fields), then the cells
TOKEN_ARRAYS = tuple(field.name for field in fields(TokenSummary))


def pair_summary_from_rows(n_positions: int, rows: dict[str, Any]) -> PairSummary:
    """A :class:`PairSummary` from one pair's padded arrays (a :class:`PairSummaries` row or a run file's row), in
    float64 and int64 whatever they were stored in."""

    def array(name: str) -> np.ndarray:
        values = np.asarray(rows[name])
        return values.astype(np.float64 if values.dtype.kind == "f" else np.int64)

    cells = array("top_cells")
    n_cells = int((cells >= 0).sum())
    token = {name: array(name)[:n_positions] for name in TOKEN_ARRAYS}
    return PairSummary(token=TokenSummary(**token), top_cells=cells[:n_cells], top_cell_values=array("top_cell_values")[:n_cells])


def summarise_map(
    interactions: Tensor | np.ndarray,
    n_positions: int,
    grid: tuple[int, int],
    n_prefix: int,
    *,
    top_cells: int,
    top_patches: int,
) -> PairSummary:
    """The summary of one pair's ``(L, S)`` map; rows past ``n_positions`` are ignored."""
    import torch

    values = torch.as_tensor(interactions)
    return summarise_maps(values[None], [n_positions], grid, n_prefix, top_cells=top_cells, top_patches=top_patches).pair(0)


def summarise_maps(
    interactions: Tensor,
    n_positions: Any,
    grid: tuple[int, int],
    n_prefix: int,
    *,
    top_cells: int,
    top_patches: int,
) -> PairSummaries:
    """:func:`summarise_map` of ``P`` maps at once: ``interactions`` ``(P, L, S)``, ``n_positions`` ``(P,)``.

    Computed in float64 on the maps' device; a pair's result does not depend on the others in the batch.
    """
    import torch

    maps = interactions.detach().to(torch.float64)
    n_pairs, length, width = maps.shape
    rows, columns = grid
    n_patches = rows * columns
    if width != n_prefix + n_patches:
        msg = f"a map of {width} image positions does not match {n_prefix} prefix positions and a {rows}x{columns} grid"
        raise ValueError(msg)
    device = maps.device
    lengths = torch.as_tensor(np.asarray(n_positions, dtype=np.int64), device=device)
    is_token = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (P, L)
    patches = maps[:, :, n_prefix:]  # (P, L, n_patches)
    token_values = maps.sum(-1)
    peak_value, peak_patch = patches.max(-1)

    mass = patches.clamp(min=0)
    total = mass.sum(-1)
    has_mass = total > 0
    share = mass / torch.where(has_mass, total, 1.0)[..., None]
    n_top = min(top_patches, n_patches)
    top_share = mass.topk(n_top, dim=-1).values.sum(-1) / torch.where(has_mass, total, 1.0)
    entropy = -torch.xlogy(share, share).sum(-1)
    entropy = entropy / np.log(n_patches) if n_patches > 1 else torch.zeros_like(entropy)
    centre_rows = (torch.arange(rows, device=device, dtype=torch.float64) + 0.5) / rows
    centre_columns = (torch.arange(columns, device=device, dtype=torch.float64) + 0.5) / columns
    centres = torch.stack(torch.meshgrid(centre_rows, centre_columns, indexing="ij"), dim=-1).reshape(n_patches, 2)
    centroid = share @ centres  # (P, L, 2)
    squared = ((centres[None, None] - centroid[:, :, None]) ** 2).sum(-1)  # (P, L, n_patches)
    spread = (share * squared).sum(-1).clamp(min=0).sqrt()

    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    token_values = torch.where(is_token, token_values, nan)
    # a row that is 0 on every patch (BOS, whose contributions are zero) has no peak: naming patch 0 would say
    # more than the map does
    has_peak = is_token & (patches != 0).any(-1)
    peak_value = torch.where(has_peak, peak_value, nan)
    peak_patch = torch.where(has_peak, peak_patch, -1)
    is_massed = is_token & has_mass
    top_share, entropy, spread = (torch.where(is_massed, x, nan) for x in (top_share, entropy, spread))
    centroid = torch.where(is_massed[..., None], centroid, nan)

    # cells: rows past a caption's positions never count (-inf), and a map smaller than k leaves -1 / NaN
    n_cells = min(top_cells, length * width)
    flat = torch.where(is_token[..., None], maps, -torch.inf).reshape(n_pairs, length * width)
    cell_values, cells = flat.topk(n_cells, dim=-1)
    is_cell = torch.isfinite(cell_values)
    cells = torch.where(is_cell, cells, -1)
    cell_values = torch.where(is_cell, cell_values, nan)

    def out(x: Tensor) -> np.ndarray:
        return x.cpu().numpy()

    return PairSummaries(
        n_positions=out(lengths),
        token=TokenSummary(values=out(token_values), peak_patch=out(peak_patch), peak_value=out(peak_value),
                           top_share=out(top_share), entropy=out(entropy), centroid=out(centroid), spread=out(spread)),
        top_cells=out(cells),
        top_cell_values=out(cell_values),
    )
