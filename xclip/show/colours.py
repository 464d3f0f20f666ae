"""The colour scale of every map and the image's outlines drawn over it, shared by the figures and the viewer.

Colour means the map and nothing else: a diverging colour map centred at zero (``RdBu_r``: red raises the
score, blue lowers it, white is zero), 256 levels indexed as matplotlib indexes them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

from xclip.core.geometry import Preprocessing

COLORMAP = "RdBu_r"
Upsample = Literal["bilinear", "nearest"]
CONTOUR = (45, 45, 45)  # the outlines' dark grey, which no level of the colour map has
# outlines of which more than this share are specks are not drawn: of the demo scenes' outlines at most 0.12
# are, of noise images' 0.7 to 0.99
SPECKLED = 0.4
_JUDGED_SIDE = 200


@lru_cache(maxsize=1)
def colour_table() -> np.ndarray:
    """``(256, 3)`` uint8: the colour map's levels, as the figures and the viewer's page draw them."""
    from matplotlib import colormaps

    return colormaps[COLORMAP](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]


def map_colours(values: np.ndarray, halfrange: float) -> np.ndarray:
    """``(..., 3)`` uint8: the colour bar's colour of each value (values beyond ``halfrange`` clip to its
    ends); matplotlib's ``RdBu_r`` with its 256 levels, indexed as matplotlib indexes it."""
    normalised = np.clip((np.asarray(values, dtype=np.float64) / halfrange + 1.0) / 2.0, 0.0, 1.0)
    return colour_table()[np.minimum((normalised * 256).astype(np.int64), 255)]


def outline_mask(view: Image.Image, geometry: Preprocessing | None = None) -> np.ndarray:
    """Where the image's colours change sharply (its shapes' outlines), as a boolean mask: the steepest
    gradients of any colour channel (a red square on a grey of equal brightness has one) of a lightly blurred
    copy (so that texture draws fewer lines), those above a sixth of the near-largest, and never more than a
    tenth of the pixels. No outlines at all where most of them would be specks rather than lines (noise, fine
    texture): they would pepper the maps without showing a shape. ``view`` drawn from ``geometry`` (the model's
    view of an image): none along the edge of its padding either, which outlines no object."""
    edges = _edges(view)
    if _is_speckled(view, edges):
        return np.zeros_like(edges)
    if geometry is None:
        return edges
    # the blur's reach, the gradient's step and one: how far from the padding's edge the detector still sees it
    return edges & ~geometry.padding_mask(view.size, margin=2 + math.ceil(_blur_radius(view.size)))


def _blur_radius(size: tuple[int, int]) -> float:
    """The outline detector's blur radius for a view of ``size`` pixels."""
    return max(1.0, max(size) / 160)


def _edges(view: Image.Image) -> np.ndarray:
    blurred = view.convert("RGB").filter(ImageFilter.GaussianBlur(_blur_radius(view.size)))
    rgb = np.asarray(blurred, dtype=np.float32)
    gradient = np.zeros(rgb.shape[:2], dtype=np.float32)
    gradient[1:-1, 1:-1] = np.hypot(rgb[1:-1, 2:] - rgb[1:-1, :-2], rgb[2:, 1:-1] - rgb[:-2, 1:-1]).max(-1)
    threshold = max(16.0, float(np.percentile(gradient, 99.5)) / 6, float(np.percentile(gradient, 90)))
    return gradient > threshold


def _is_speckled(view: Image.Image, edges_of_view: np.ndarray) -> bool:
    """Whether more than ``SPECKLED`` of the outline pixels are specks: judged at one size (200 pixels on the
    long side), so that a figure's DPI does not change the answer. There a shape's outline is a line at least
    3 pixels thick, so an outline pixel with fewer than 8 others within 2 pixels of it lies in a speck.
    ``edges_of_view`` are the view's own edges: those of a view already at that size."""
    scale = _JUDGED_SIDE / max(view.size)
    judged = (max(3, round(view.size[0] * scale)), max(3, round(view.size[1] * scale)))
    edges = edges_of_view if judged == view.size else _edges(view.resize(judged, Image.Resampling.BICUBIC))
    if not edges.any():
        return False
    counts = np.pad(edges.astype(np.int32), ((3, 2), (3, 2))).cumsum(0).cumsum(1)  # a summed-area table
    near = counts[5:, 5:] - counts[:-5, 5:] - counts[5:, :-5] + counts[:-5, :-5]  # within 2 pixels, itself included
    return float((edges & (near < 9)).sum() / edges.sum()) > SPECKLED


def map_panel(view: Image.Image, patch_map: np.ndarray, halfrange: float, upsample: Upsample = "bilinear",
              contours: np.ndarray | None = None) -> Image.Image:
    """The patch map at the view's size in the colour bar's colours, with the view's contours over it."""
    resample = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}[upsample]
    field_ = Image.fromarray(np.asarray(patch_map, dtype=np.float32), mode="F").resize(view.size, resample)
    colours = map_colours(np.asarray(field_), halfrange)
    if contours is None:
        contours = outline_mask(view)
    colours[contours] = CONTOUR
    return Image.fromarray(colours)
