"""Grounding metrics for signed attribution maps, pure numpy; every function takes one map and one region.

``values`` is any array of attributions (a patch map or per-token scores) and ``inside`` an array of the same
shape marking the ground-truth region: booleans (the phrase's tokens), or weights in [0, 1] (the share of each
patch's area inside the boxes, see :mod:`xclip.core.geometry`), where a patch counts inside by its weight and outside
by the rest.
"""

from __future__ import annotations

import numpy as np


def pointing_game(values: np.ndarray, inside: np.ndarray) -> float:
    """1.0 when the largest value lies in the region (a patch the boxes cover any part of), else 0.0."""
    return float(inside.reshape(-1)[int(np.argmax(values.reshape(-1)))] > 0)


def energy_in_box(values: np.ndarray, inside: np.ndarray) -> float:
    """Share of the positive mass that lies inside the region (0 when there is no positive mass)."""
    positive = np.clip(values, 0, None)
    total = positive.sum()
    return float((positive * inside).sum() / total) if total > 0 else 0.0


def mass_ratio(values: np.ndarray, inside: np.ndarray) -> float:
    """``correct / (correct + wrong)`` with correct = positive mass inside + negative mass outside and
    wrong = positive mass outside + negative mass inside; 0.5 is chance (Baniecki et al. 2025)."""
    positive, negative = np.clip(values, 0, None), np.clip(-values, 0, None)
    weight = np.asarray(inside, dtype=np.float64)
    correct = (positive * weight).sum() + (negative * (1 - weight)).sum()
    wrong = (positive * (1 - weight)).sum() + (negative * weight).sum()
    total = correct + wrong
    return float(correct / total) if total > 0 else 0.5
