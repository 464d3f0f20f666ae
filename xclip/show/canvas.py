"""The pen figures are drawn with: it draws onto a raster picture (the PNG) and records each call, and the record
is replayed through matplotlib's SVG and PDF backends, so that vector files hold the same figure with its text
as text and its image, maps and colour bars embedded pixel for pixel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


class Canvas:
    """Draws a figure onto a raster picture and records each call, so that SVG and PDF files get the same
    figure with its text as text (the record is replayed by :func:`save_vector`)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.picture = Image.new("RGB", size, "white")
        self._pen = ImageDraw.Draw(self.picture)
        self.drawn: list[tuple[Any, ...]] = []

    def text(self, xy: tuple[float, float], text: str, fill: Any, font: ImageFont.FreeTypeFont) -> None:
        self._pen.text(xy, text, fill=fill, font=font)
        self.drawn.append(("text", xy, text, fill, font.size))

    def rectangle(self, bounds: Sequence[float], fill: Any = None, outline: Any = None, width: int = 1) -> None:
        self._pen.rectangle(list(bounds), fill=fill, outline=outline, width=width)
        self.drawn.append(("rectangle", tuple(bounds), fill, outline, width))

    def line(self, points: Sequence[float], fill: Any) -> None:
        self._pen.line(list(points), fill=fill)
        self.drawn.append(("line", tuple(points), fill))

    def paste(self, picture: Image.Image, xy: tuple[int, int]) -> None:
        self.picture.paste(picture, xy)
        self.drawn.append(("image", xy, picture))


def _colour(fill: Any) -> Any:
    """A Pillow colour (a name or 0-255 channels) as matplotlib takes it."""
    return tuple(c / 255 for c in fill) if isinstance(fill, tuple) else fill


def save_vector(drawn: Sequence[tuple[Any, ...]], size: tuple[int, int], dpi: int, title: str, path: Path, kind: str,
                metadata: dict[str, str]) -> None:
    """Replay a :class:`Canvas`'s record of a picture of ``size`` into matplotlib's SVG or PDF backend: text stays
    text (in DejaVu Sans, the font of the PNG), the maps and colour bars are embedded as the PNG's own pixels."""
    import matplotlib
    from matplotlib.figure import Figure as Page
    from matplotlib.patches import Rectangle

    width, height = size
    points = 72 / dpi  # matplotlib measures text and lines in points
    # each picture embedded on its own, pixel for pixel, and fonts kept as text (TrueType in PDF)
    settings = {"svg.fonttype": "none", "pdf.fonttype": 42, "font.family": "DejaVu Sans", "image.composite_image": False}
    with matplotlib.rc_context(settings):
        page = Page(figsize=(width / dpi, height / dpi), dpi=dpi)
        axes = page.add_axes((0, 0, 1, 1))
        for kind_, *item in drawn:
            if kind_ == "image":
                (x, y), picture = item
                axes.imshow(np.asarray(picture), extent=(x, x + picture.size[0], y + picture.size[1], y),
                            interpolation="none", aspect="auto")  # "none": embedded as they are, not resampled
            elif kind_ == "text":
                (x, y), text, fill, font_size = item
                axes.text(x, y, text, color=_colour(fill), fontsize=font_size * points, va="top", ha="left")
            elif kind_ == "rectangle":
                (x0, y0, x1, y1), fill, outline, line_width = item
                axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=_colour(fill) if fill else "none",
                                         edgecolor=_colour(outline) if outline else "none", linewidth=line_width * points))
            else:
                (x0, y0, x1, y1), fill = item
                axes.plot([x0, x1], [y0, y1], color=_colour(fill), linewidth=points)
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        axes.set_axis_off()
        described = " ".join(f"{key}={value}" for key, value in metadata.items())
        page.savefig(path, format=kind, metadata={"Title": title, "Description" if kind == "svg" else "Subject": described})
