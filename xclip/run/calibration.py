"""Calibration of a model's panel layouts: find, on a few inputs, the first panels that let the adaptive rule meet
its tolerance with the fewest forward passes.

A layout is judged by running the real rule with it: the cost of a layout is the mean number of forward passes its
inputs take (integrand evaluations plus panel edges, each a pass of the upper encoder; the largest breaks ties), so a layout can never be chosen for a guarantee it does not keep. The search
starts from the default layout and from narrow stretches, in one or two panels, around each tenth of the path (the
roughness of a trained model sits in one stretch per tower), then moves, removes and adds breakpoints, taking the best change each round,
while that lowers the cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xclip.models.base import DualEncoderAdapter, ImageLike
from xclip.attribution.engine import InteractionAttribution
from xclip.core.quadrature import DEFAULT_BREAKPOINTS, MAX_BREAKPOINTS
from xclip.errors import ConfigError, InputError
from xclip.attribution.panels import Calibration, PanelLayout

if TYPE_CHECKING:
    from xclip.config import RunConfig

Breakpoints = tuple[float, ...]
# the search's steps along the path: a trained model's rough stretch is a few hundredths wide
MOVES = (0.04, 0.02, 0.01)
SMALLEST_PANEL = 0.01
MAX_TRIALS = 240
DEFAULT_INPUTS = 32  # per tower: 32 demo-world inputs chose layouts that held on 48 held-out ones (docs/method.md)


@dataclass(frozen=True)
class TowerCalibration:
    """What calibration found for one tower.

    Attributes:
        breakpoints: the chosen layout's breakpoints.
        default_passes, chosen_passes: ``(mean, max)`` forward passes (nodes plus panel edges) per calibration input
            with the default and the chosen layout.
        n_inputs: calibration inputs.
        n_trials: layouts tried.
    """

    breakpoints: Breakpoints
    default_passes: tuple[float, int]
    chosen_passes: tuple[float, int]
    n_inputs: int
    n_trials: int


def calibrate(
    model: DualEncoderAdapter,
    captions: Sequence[str],
    images: Sequence[ImageLike],
    *,
    progress: Callable[[str, int], None] | None = None,
    **keywords: Any,
) -> Calibration:
    """Choose each tower's panel layout on these inputs.

    Args:
        model: a family adapter from :func:`xclip.load_model`.
        captions, images: calibration inputs (a dozen of each is plenty; more only make calibration slower).
        progress: called with the tower and the number of layouts tried so far.
        keywords: :class:`~xclip.InteractionAttribution`'s keyword arguments: its settings (layers, references,
            tolerance, ...) or ``settings=`` all of them as one object, and ``internal_batch_size``; the layout is
            stored for the settings that shape the path.

    Returns:
        A :class:`~xclip.attribution.panels.Calibration` for :func:`xclip.attribution.panels.save_calibration`.
    """
    keywords.pop("panel_layout", None)
    probe = InteractionAttribution(model, panel_layout="default", **keywords)  # checks the settings once
    text_batch, image_batch = model.tokenize(captions), model.preprocess(images)  # read once, tried many times
    towers = {
        "text": _calibrate_tower(
            lambda layout: [c.n_nodes + c.n_endpoints for c in _attributor(probe, text=layout).text_batch_contributions(text_batch)],
            lambda done: progress("text", done) if progress else None,
        ),
        "image": _calibrate_tower(
            lambda layout: [c.n_nodes + c.n_endpoints for c in _attributor(probe, image=layout).image_batch_contributions(image_batch)],
            lambda done: progress("image", done) if progress else None,
        ),
    }
    measured = {
        tower: {
            "inputs": found.n_inputs,
            "layouts_tried": found.n_trials,
            "tolerance": probe.tolerance,
            "default_passes_mean": round(found.default_passes[0], 2),
            "default_passes_max": found.default_passes[1],
            "passes_mean": round(found.chosen_passes[0], 2),
            "passes_max": found.chosen_passes[1],
        }
        for tower, found in towers.items()
    }
    return Calibration(settings=probe.path_settings, text=towers["text"].breakpoints, image=towers["image"].breakpoints, measured=measured)


def _attributor(probe: InteractionAttribution, *, text: Breakpoints = DEFAULT_BREAKPOINTS,
                image: Breakpoints = DEFAULT_BREAKPOINTS) -> InteractionAttribution:
    """The probe's settings with another layout."""
    return InteractionAttribution(probe.model, settings=probe.settings, internal_batch_size=probe.internal_batch_size,
                                  panel_layout=PanelLayout(text=text, image=image))


def _calibrate_tower(passes_of: Callable[[Breakpoints], list[int]], progress: Callable[[int], None]) -> TowerCalibration:
    """Greedy search over layouts, each judged by the forward passes the real rule takes with it."""
    tried: dict[Breakpoints, list[int]] = {}  # each layout's passes per input, every layout run once

    def cost(layout: Breakpoints) -> tuple[float, int]:
        layout = tuple(round(b, 4) for b in layout)
        if layout not in tried:
            tried[layout] = passes_of(layout)
            progress(len(tried))
        return float(np.mean(tried[layout])), max(tried[layout])

    best = DEFAULT_BREAKPOINTS
    cost(best)
    for centre in np.arange(0.1, 0.95, 0.1):  # a narrow stretch around each tenth, in one or two panels
        for half_width in (0.05, 0.1):
            for layout in ((centre - half_width, centre + half_width), (centre - half_width, centre, centre + half_width)):
                candidate = _valid(layout)
                if candidate is not None and cost(candidate) < cost(best):
                    best = candidate
    for step in MOVES:  # steepest descent: every neighbour is tried, the best taken, until none improves
        while len(tried) < MAX_TRIALS:
            neighbours = _neighbours(best, step)[: MAX_TRIALS - len(tried)]
            champion = min(neighbours, key=cost, default=best)
            if cost(champion) >= cost(best):
                break
            best = champion
    return TowerCalibration(
        breakpoints=tuple(round(b, 4) for b in best),
        default_passes=cost(DEFAULT_BREAKPOINTS),
        chosen_passes=cost(best),
        n_inputs=len(tried[DEFAULT_BREAKPOINTS]),
        n_trials=len(tried),
    )


def _neighbours(layout: Breakpoints, step: float) -> list[Breakpoints]:
    """Each breakpoint moved by ``step`` either way, each removed, and a new one at a quarter, third, half, two
    thirds or three quarters of each panel (one new breakpoint rarely pays where it lands first: the places to
    try must be more than the middle)."""
    edges = (0.0, *layout, 1.0)
    moved = [layout[:k] + (b + sign * step,) + layout[k + 1 :] for k, b in enumerate(layout) for sign in (-1, 1)]
    removed = [layout[:k] + layout[k + 1 :] for k in range(len(layout))]
    added = [
        tuple(sorted((*layout, lo + share * (hi - lo))))
        for lo, hi in zip(edges[:-1], edges[1:])
        for share in (1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4)
    ]
    return [c for c in (_valid(c) for c in moved + removed + added) if c is not None]


def _valid(layout: Sequence[float]) -> Breakpoints | None:
    """The layout rounded, or None if a panel would be narrower than :data:`SMALLEST_PANEL` or there are too many."""
    rounded = tuple(round(float(b), 4) for b in layout)
    edges = (0.0, *rounded, 1.0)
    if len(rounded) > MAX_BREAKPOINTS or any(hi - lo < SMALLEST_PANEL for lo, hi in zip(edges[:-1], edges[1:])):
        return None
    return rounded


def calibration_inputs(captions: Sequence[str], images: Sequence[Path], n_inputs: int = DEFAULT_INPUTS) -> tuple[list[str], list[Path]]:
    """The first ``n_inputs`` distinct captions and images of a dataset, evenly spread over it (the first rows of
    a dataset are often one image's captions, or one folder's images).

    Raises:
        ConfigError: no caption or no image to calibrate on.
    """
    if n_inputs < 1:
        msg = f"the number of calibration inputs must be at least 1, got {n_inputs}"
        raise ConfigError(msg)
    if not captions or not images:
        msg = "calibration needs captions and images: the data has none"
        raise ConfigError(msg)

    def spread(items: Sequence[Any]) -> list[Any]:
        picks = np.unique(np.linspace(0, len(items) - 1, min(n_inputs, len(items))).round().astype(int))
        return [items[k] for k in picks]

    return spread(captions), spread(images)


def calibrate_run_config(
    config: RunConfig, n_inputs: int = DEFAULT_INPUTS, progress: Callable[[str, int], None] | None = None
) -> tuple[Calibration, DualEncoderAdapter, list[str]]:
    """Calibrate a run config's model under its attribution settings on a spread of its data.

    Returns:
        The calibration, the loaded model, and the calibration images that could not be read (left out).

    Raises:
        ConfigError: the config uses a fixed rule, or its data holds no readable image.
    """
    from xclip.run.data import read_dataset
    from xclip.attribution.from_config import load_attributor
    from xclip.disk.archives import ArchiveMembers

    if config.attribution.n_steps is not None:
        msg = "calibration chooses the adaptive rule's panels: the config sets attribution.n_steps (a fixed rule)"
        raise ConfigError(msg, setting="n_steps")
    dataset = read_dataset(config.data)
    captions, images = calibration_inputs(dataset.captions, dataset.images, n_inputs)
    attributor, _ = load_attributor(config)
    model = attributor.model
    readable, unreadable = [], []
    with ArchiveMembers() as archives:  # images inside tar or parquet files: each archive indexed once
        for image in images:
            try:
                readable.append(model.preprocess_image(archives.image(image)).image)
            except InputError as e:
                unreadable.append(f"{image}: {e}")
            except OSError as e:
                unreadable.append(f"{image}: {e.strerror or e}")
    if not readable:
        msg = "none of the calibration images could be read:\n  " + "\n  ".join(unreadable)
        raise ConfigError(msg)
    calibration = calibrate(model, captions, readable, progress=progress, settings=config.attribution.settings,
                            internal_batch_size=config.runtime.internal_batch_size)
    return calibration, model, unreadable


# the demo's world for calibrating xclip:demo without data: a seed neither its training, its demo scenes nor
# `make grounding` use
CALIBRATION_SEED = 60_000


def model_run_config(model: str, data: Path | None, folder: Path, n_inputs: int) -> Path:
    """A run config in ``folder`` for calibrating ``model`` on ``data``, an image folder with metadata.jsonl (for a
    shipped model without data: ``n_inputs`` scenes of its world), for ``xclip calibrate MODEL``."""
    import yaml

    from xclip.models.loading import shipped_model
    from xclip.analysis.synthetic import generate, write_scenes

    if data is None:
        if shipped_model(model) is None:
            raise ConfigError(f"give --data FOLDER (an image folder with metadata.jsonl) to calibrate {model!r} on, or a run config")
        data = write_scenes(generate(n_inputs, seed=CALIBRATION_SEED), folder / "scenes")
    config = {
        "model": {"name": model},
        "data": {"format": "imagefolder", "root": str(data.resolve()), "metadata": str((data / "metadata.jsonl").resolve())},
        "output": {"directory": str(folder / "unused")},
    }
    path = folder / "calibrate.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
