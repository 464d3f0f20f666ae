"""Means with 95 % bootstrap intervals, paired differences, and the charts and table cells that show them.

Every summary that ``xclip evaluate`` and ``xclip compare`` report is a mean of per-phrase or per-pair scores with
a percentile bootstrap interval of that mean (:func:`mean_interval`). A difference between two methods or runs
scored on the same phrases is paired (:func:`paired_difference`): the differences are resampled phrase by phrase,
so two runs that agree differ by exactly zero. The same seed draws the same resamples, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xclip.disk.files import write_atomically

# below this many samples a percentile bootstrap interval is too narrow to trust: it resamples the few values
# there are (one value gives a zero-width interval), so tables and charts mark such counts "(too few)"
MIN_N_FOR_INTERVAL = 10


def bootstrap_ci(samples: np.ndarray, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = samples[rng.integers(0, samples.size, size=(n_resamples, samples.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@dataclass(frozen=True)
class MeanInterval:
    """The mean of ``n`` samples and its 95 % bootstrap interval ``ci95`` (low, high)."""

    mean: float
    ci95: list[float]
    n: int

    def record(self) -> dict[str, Any]:
        """``{"mean", "ci95", "n"}``, as the report files store a summary."""
        return {"mean": self.mean, "ci95": self.ci95, "n": self.n}


def mean_interval(samples: np.ndarray, *, seed: int = 0) -> MeanInterval:
    """The mean of ``samples`` with its bootstrap interval (:func:`bootstrap_ci` with ``seed``)."""
    samples = np.asarray(samples)
    return MeanInterval(float(samples.mean()), list(bootstrap_ci(samples, seed=seed)), len(samples))


def paired_difference(values: np.ndarray, reference: np.ndarray, *, seed: int = 0) -> MeanInterval:
    """The mean of ``values - reference`` (the same phrases or pairs, in the same order) with its interval: the
    two are resampled together, which is far narrower than two intervals side by side."""
    return mean_interval(np.asarray(values) - np.asarray(reference), seed=seed)


def count_text(n: int) -> str:
    """``n=40``, with `` (too few)`` below :data:`MIN_N_FOR_INTERVAL`."""
    return f"n={n}{' (too few)' if n < MIN_N_FOR_INTERVAL else ''}"


def interval_text(mean: float, ci95: Sequence[float], n: int, *, signed: bool = False) -> str:
    """``0.988 [0.95, 1.00] n=40``, with `` (too few)`` below :data:`MIN_N_FOR_INTERVAL`."""
    sign = "+" if signed else ""
    low, high = ci95
    return f"{mean:{sign}.3f} [{low:{sign}.2f}, {high:{sign}.2f}] {count_text(n)}"


def interval_figure(n_bars: int, width_per_bar: float) -> tuple[Any, Any]:
    """A matplotlib figure and its axes for ``n_bars`` bars (or groups of bars), wide enough for their labels."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.5, width_per_bar * n_bars + 2), 3.8), layout="constrained")
    return figure, figure.add_subplot()


def interval_bars(axes: Any, positions: np.ndarray, summaries: Sequence[dict[str, Any]], **style: Any) -> None:
    """A bar at each summary's ``mean`` with whiskers to its ``ci95`` (as in :meth:`MeanInterval.record`)."""
    means = np.array([s["mean"] for s in summaries])
    whiskers = np.abs(np.array([s["ci95"] for s in summaries]).T - means)  # below and above each mean
    axes.bar(positions, means, yerr=whiskers, **style)


def save_chart(figure: Any, path: Path) -> Path:
    """Write ``figure`` as ``path``, in the format its suffix names, replacing an earlier file only when done."""
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format=path.suffix[1:]))
