"""Figures of interaction maps: a caption span's map on the image, a box's interactions with the caption's words.

Colour means the map and nothing else. Maps are drawn at full opacity in a diverging colour map centred at
zero (``RdBu_r``: red raises the score, blue lowers it, white is zero), so every map pixel has a colour of the
colour bar; the image is shown once in colour beside them, and as its contours (dark grey lines where its
grey levels change) over each map, so that shapes can be found without their colours mixing into the map's.
Where the model's preprocessing cut part of the image (a centre crop), the image panel shows the whole image
with the part the model saw outlined and the rest dimmed, and a note says how much it saw; the map panels
show the model's view, the only part the maps are of.
Every map panel of a figure shares one scale, its colour bar's; the words of the caption below are coloured on
a second scale with a bar of its own (a word's total is a sum over many patches). ``scale`` fixes either the
map scale (a number) or shares it among all figures of one call (``"run"``).

Two layouts: ``wide`` fits a paper's text width (at most 7 in, up to four panels a row) and ``column`` one
column of it (3.5 in, two panels a row); panels shrink to fit, up to 2 in.

Figures are composed with Pillow (matplotlib supplies the colour map and the font), which makes them fast:
the demo draws more than ten per-word figures a second on one core (``scripts/render_speed.py``). For SVG
and PDF the same drawing is replayed through matplotlib's vector backends (:mod:`xclip.show.canvas`): text stays
text, and the image, maps and colour bars are embedded pixel for pixel as in the PNG.

This module lays a figure out and draws it; what it holds comes from :mod:`xclip.show.content`, its text is
measured by :mod:`xclip.show.text`, and :mod:`xclip.show.render` draws the pairs of a run.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from xclip.attribution.result import InteractionMap
from xclip.attribution.inputs_read import caption_read
from xclip.core.geometry import Preprocessing
from xclip.core.quadrature import DEFAULT_TOLERANCE
from xclip.disk.files import no_space_error
from xclip.errors import ConfigError
from xclip.models.base import read_image
from xclip.show.canvas import Canvas, save_vector
from xclip.show.colour_bars import horizontal_bar, under_bar, vertical_bar, vertical_bar_width
from xclip.show.colours import COLORMAP, Upsample, map_colours, map_panel, outline_mask
from xclip.show.content import STOP_WORDS, Content, figure_content, halfranges_of
from xclip.show.pairs import SEEN_WHOLE, PairView, pair_view
from xclip.show.text import dejavu_sans, layout_strip, line_height, panel_title_fitting, wrap
from xclip.store.directory import FIGURE_MARK_KEY

FORMATS = ("png", "svg", "pdf")
PANEL_SIDE = 200  # the most a map panel's side is, in pixels at 100 DPI (2 in)
Scale = Literal["figure", "run"] | float
Layout = Literal["wide", "column"]


@dataclass(frozen=True)
class _Page:
    """How a layout fits a page: widths in inches (so the same at any DPI), font sizes in pixels at 100 DPI."""

    max_width: float
    min_width: float
    columns: int  # panels a row at most (the image's counts as one)
    fonts: tuple[int, int, int]  # title, text, small


# wide: the text width of a two-column paper; column: one of its columns
_PAGES = {"wide": _Page(7.0, 4.8, 4, (15, 13, 11)), "column": _Page(3.5, 3.5, 2, (13, 12, 10))}
CROP = (40, 40, 40)  # the outline of the crop on the whole image


@dataclass(frozen=True)
class FigureOptions:
    scale: Scale = "figure"  # map scale: each figure its own, one for all figures of a call, or a fixed value
    upsample: Upsample = "bilinear"
    dpi: int = 100
    # per-word figures draw no panel for these words, nor for punctuation; an empty set draws every word
    skip_words: frozenset[str] = STOP_WORDS
    layout: Layout = "wide"  # "wide": at most 7 in wide; "column": 3.5 in, one column of a paper

    def __post_init__(self) -> None:
        if not (self.scale in ("figure", "run") or (isinstance(self.scale, float) and math.isfinite(self.scale) and self.scale > 0)):
            msg = f"scale must be figure, run or a positive number, got {self.scale!r}"
            raise ConfigError(msg, setting="scale")
        if self.upsample not in ("bilinear", "nearest"):
            msg = f"upsample must be bilinear or nearest, got {self.upsample!r}"
            raise ConfigError(msg, setting="upsample")
        if not 30 <= self.dpi <= 600:
            msg = f"dpi must be between 30 and 600, got {self.dpi}"
            raise ConfigError(msg, setting="dpi")
        if self.layout not in _PAGES:
            msg = f"layout must be {' or '.join(_PAGES)}, got {self.layout!r}"
            raise ConfigError(msg, setting="layout")


@dataclass(frozen=True)
class Figure:
    """A drawn figure: the picture, the scales its two colour bars show, and notes for the reader."""

    picture: Image.Image
    name: str  # a file name without suffix: "pair000012", "pair000012_span-red-square", ...
    map_halfrange: float  # the map colour bar spans [-map_halfrange, +map_halfrange]
    word_halfrange: float
    dpi: int
    notes: list[str] = field(default_factory=list)  # everything written under the figure
    warnings: list[str] = field(default_factory=list)  # of those, what a caller should pass on (unknown words, clipping)
    input_warnings: list[str] = field(default_factory=list)  # of those, the ones about the pair's inputs (unknown words, a crop)
    drawn: tuple[tuple[Any, ...], ...] = ()  # what drew the picture, replayed for SVG and PDF (see Canvas)

    def save(self, path: str | Path) -> Path:
        """Write the figure as PNG, PDF or SVG (by the suffix); the scales go into the file's metadata. SVG
        and PDF keep the text as text and embed the maps at the figure's DPI."""
        path = Path(path)
        kind = path.suffix.lower().lstrip(".")
        if kind not in FORMATS:
            msg = f"cannot save a figure as {path.name!r}: the suffix must be one of {', '.join(FORMATS)}"
            raise ConfigError(msg)
        made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {FIGURE_MARK_KEY: f"{self.map_halfrange:.6g}", "xclip:word_halfrange": f"{self.word_halfrange:.6g}",
                    "xclip:colormap": COLORMAP}
        # written under a temporary name beside it, then renamed: a figure killed while being written never lies
        # half written under its name, and a figure drawn again replaces the old one whole (a figure is redrawn
        # from the run file in a moment, so it is not fsynced)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if kind == "png":
                info = PngInfo()
                for key, value in metadata.items():
                    info.add_text(key, value)
                self.picture.save(temporary, format="PNG", pnginfo=info, dpi=(self.dpi, self.dpi), compress_level=3)
            else:
                save_vector(self.drawn, self.picture.size, self.dpi, self.name, temporary, kind, metadata)
            os.replace(temporary, path)
        except BaseException as e:
            temporary.unlink(missing_ok=True)
            for folder in made:  # the folders this call made, if nothing is in them
                with suppress(OSError):
                    folder.rmdir()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(path) from e
            raise
        return path


def draw(view: PairView, *, span: str | None = None, box: tuple[float, float, float, float] | None = None,
         options: FigureOptions | None = None, layout: Layout | None = None) -> Figure:
    """One figure of a pair: the span's map (``span``), the box's interactions with the words (``box``), or a
    panel per content word (neither). ``layout`` (``"wide"`` or ``"column"``) replaces the options' layout."""
    options = with_layout(options, layout)
    return draw_content(view, figure_content(view, span, box, options.skip_words), options)


def figure(result: InteractionMap, image: Image.Image | str | Path, *, span: str | None = None,
           box: tuple[float, float, float, float] | None = None, options: FigureOptions | None = None,
           title: str = "pair", layout: Layout | None = None, tolerance: float | None = DEFAULT_TOLERANCE) -> Figure:
    """Draw an API result as ``xclip render`` draws a run's pair; ``.save(path)`` writes it. ``layout``
    (``"wide"`` or ``"column"``) replaces the options' layout; ``tolerance`` is the attribution's, for the note on
    an inexact map."""
    picture = read_image(Path(image))[0] if isinstance(image, (str, Path)) else image
    if box is not None:
        check_box_inside(box, picture.size, title)
    return draw(pair_view(result, picture, title=title, tolerance=tolerance), span=span, box=box, options=options, layout=layout)


def check_box_inside(box: tuple[float, float, float, float], size: tuple[int, int], what: str) -> None:
    """Refuse a box that reaches beyond the image of ``what``."""
    width, height = size
    if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
        msg = f"box {','.join(f'{v:g}' for v in box)} is not inside the image of {what} ({width} x {height} pixels)"
        raise ConfigError(msg, setting="box")


def with_layout(options: FigureOptions | None, layout: Layout | None) -> FigureOptions:
    options = options or FigureOptions()
    return options if layout is None else replace(options, layout=layout)


def draw_content(view: PairView, content: Content, options: FigureOptions, halfranges: tuple[float, float] | None = None) -> Figure:
    """``halfranges`` (map, words) replaces the figure's own scales: ``render_run``'s ``scale="run"``.

    Laid out from the top: the header, the panels in rows (the image first) with the map colour bar on their
    right, the caption strip with its colour bar, the notes; each part measured before it is placed, so that
    no text meets another or leaves the page at any DPI, layout or image shape."""
    map_range, word_range = halfranges or halfranges_of(content)
    warnings = list(content.warnings)
    if isinstance(options.scale, float):
        peak = max((float(np.abs(m).max()) for _, m in content.panels), default=0.0)
        map_range = options.scale
        if peak > map_range:
            warnings.append(f"map values reach ±{peak:.3g}, beyond the fixed scale ±{map_range:.3g}: they are drawn at its ends")
    notes = warnings + content.notes
    page = _PAGES[options.layout]
    k = options.dpi / 100  # every length below is in pixels at 100 DPI
    px = lambda v: round(v * k)  # noqa: E731
    title_font, text_font, small_font = (dejavu_sans(px(size)) for size in page.fonts)
    margin, gap, title_h = px(14), px(10), line_height(text_font)
    max_width = math.floor(page.max_width * options.dpi)

    # the panels: as large as fit beside the map colour bar, up to PANEL_SIDE
    bar_label = "per patch"
    bar_w = vertical_bar_width(map_range, bar_label, small_font, px) if content.panels and map_range > 0 else 0
    room = max_width - 2 * margin - (gap + bar_w if bar_w else 0)
    shown = _shown_box(view)
    image_slots = 2 if (shown[2] - shown[0]) > 1.5 * (shown[3] - shown[1]) else 1  # a wide whole image: two panels' room
    columns = min(image_slots + len(content.panels), page.columns)
    side = min(px(PANEL_SIDE), (room - (columns - 1) * gap) // columns)
    display = view.image.convert("RGB").resize(_fit(view.image.size, (side, side)), Image.Resampling.BICUBIC)
    contours = outline_mask(display, view.geometry) if content.panels else None  # box mode draws no map panel
    is_cut = shown != view.geometry.crop_box
    image_room = (min(room, image_slots * side + (image_slots - 1) * gap), side)
    image_tile = _whole_image(view, shown, image_room) if is_cut else display
    # a map of zeros has no scale of its own: any halfrange draws it white
    pictures = [image_tile] + [map_panel(display, m, map_range or 1.0, options.upsample, contours) for _, m in content.panels]
    titles = ["image"] + [title for title, _ in content.panels]
    slots = [max(side, picture.size[0]) for picture in pictures]  # a narrow (tall) panel keeps room for its title
    corners = _flow(slots, [picture.size[1] for picture in pictures], room, gap, title_h)
    block_w = max(x + w for (x, _), w in zip(corners, slots))
    block_h = max(y + title_h + picture.size[1] for (_, y), picture in zip(corners, pictures))
    min_width = math.floor(page.min_width * options.dpi)
    width = min(max_width, max(min_width, 2 * margin + block_w + (gap + bar_w if bar_w else 0)))

    header = [f"{view.title}: score {view.score:.4f}, four-term value {view.four_term_value:.4f}, "
              f"completeness error {view.completeness_error:.2e}", _caption_header(view)]
    header_lines = [line for text in header for line in wrap(text, title_font, width - 2 * margin)]
    panels_top = margin + line_height(title_font) * len(header_lines) + gap
    bar_h = max(px(100), block_h - title_h)
    bar_bottom = title_h + bar_h + px(10) + line_height(small_font) * len(under_bar(map_range, bar_label)) if bar_w else 0
    block_bottom = panels_top + max(block_h, bar_bottom)
    strip_label = wrap(f"caption words, {content.word_label}:", small_font, width - 2 * margin)
    label_top = block_bottom + px(16)
    strip_top = label_top + line_height(small_font) * len(strip_label) + px(4)
    strip = layout_strip(content.words, text_font, width - 2 * margin, px)
    strip_h = (strip[-1][2] + px(22)) if strip else 0
    word_bar_top = strip_top + strip_h + px(10)
    has_word_bar = bool(strip) and word_range > 0
    notes_top = word_bar_top + (px(15) + line_height(small_font) if has_word_bar else 0) + px(12)
    note_lines = [line for note in notes for line in wrap(note, small_font, width - 2 * margin)]
    height = notes_top + line_height(small_font) * len(note_lines) + margin

    pen = Canvas((width, height))
    for n, line in enumerate(header_lines):
        pen.text((margin, margin + n * line_height(title_font)), line, fill="black", font=title_font)
    for (x, y), slot, title, picture in zip(corners, slots, titles, pictures):
        x, y = margin + x, panels_top + y
        fitted, font = panel_title_fitting(title, text_font, slot)
        pen.text((x, y), fitted, fill="black", font=font)
        pen.paste(picture, (x, y + title_h))
    image_at = (margin + corners[0][0], panels_top + corners[0][1] + title_h)
    if is_cut:
        _outline(pen, image_at, _to_tile(view.geometry.crop_box, shown, image_tile.size), CROP, px(2), px)
    if content.box is not None:
        _outline(pen, image_at, _to_tile(content.box, shown, image_tile.size), "black", px(3), px)
    if bar_w:
        vertical_bar(pen, (margin + block_w + gap, panels_top + title_h), (px(14), bar_h), map_range, bar_label,
                      small_font, px)
    for n, line in enumerate(strip_label):
        pen.text((margin, label_top + n * line_height(small_font)), line, fill="black", font=small_font)
    for (_, word_rows, value), (x, w, y, text) in zip(content.words, strip):
        colour = tuple(int(c) for c in map_colours(np.array(value), word_range or 1.0))
        bounds = [margin + x, strip_top + y, margin + x + w, strip_top + y + px(22)]
        is_highlighted = any(r in content.highlighted for r in word_rows)
        pen.rectangle(bounds, fill=colour, outline="black" if is_highlighted else (190, 190, 190), width=px(2) if is_highlighted else 1)
        light = sum(colour) / 3 > 110
        pen.text((bounds[0] + px(5), bounds[1] + px(3)), text, fill="black" if light else "white", font=text_font)
    if has_word_bar:
        horizontal_bar(pen, (margin, word_bar_top), (min(px(220), width - 2 * margin - px(90)), px(10)), word_range,
                        small_font, px)
    for n, line in enumerate(note_lines):
        pen.text((margin, notes_top + n * line_height(small_font)), line, fill=(90, 90, 90), font=small_font)
    return Figure(pen.picture, content.name, map_range, word_range, options.dpi, notes, warnings, content.input_warnings,
                  tuple(pen.drawn))


def _caption_header(view: PairView) -> str:
    """The caption as the model read it: a truncated one up to its cut, marked, the rest left to the notes."""
    read = caption_read(view.tokens, is_truncated=view.is_truncated)
    if not read.is_truncated:
        return f"“{view.caption}”"
    n_unread = read.n_words - read.n_words_read
    return f"“{read.read_text.rstrip()}” | cut here: the model did not read the other {n_unread} word{'s' if n_unread != 1 else ''}"


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled to fit in ``box``, its aspect kept."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _flow(widths: list[int], heights: list[int], room: int, gap: int, title_h: int) -> list[tuple[int, int]]:
    """The top-left corner of each panel (its title above its picture), left to right in rows no wider than
    ``room``."""
    corners, x, y, row_h = [], 0, 0, 0
    for w, h in zip(widths, heights):
        if x > 0 and x + w > room:
            x, y, row_h = 0, y + row_h + gap, 0
        corners.append((x, y))
        x += w + gap
        row_h = max(row_h, title_h + h)
    return corners


def _shown_box(view: PairView) -> tuple[float, float, float, float]:
    """What the image panel shows, in original pixels: the model's view (its crop box) or, where the crop cut
    part of the image, the whole image with the crop box (which may reach beyond it, as padding does)."""
    geometry = view.geometry
    if view.original is None or geometry.seen_share >= SEEN_WHOLE:
        return geometry.crop_box
    (width, height), (x0, y0, x1, y1) = geometry.original_size, geometry.crop_box
    return min(0.0, x0), min(0.0, y0), max(float(width), x1), max(float(height), y1)


def _whole_image(view: PairView, shown: tuple[float, float, float, float], room: tuple[int, int]) -> Image.Image:
    """The image panel of a cropped image: ``shown`` of the original, fitted into ``room``, dimmed outside the
    crop box (the part the model never saw)."""
    x0, y0, x1, y1 = shown
    size = _fit((max(1, round(x1 - x0)), max(1, round(y1 - y0))), room)
    geometry = view.geometry
    picture = Preprocessing(geometry.original_size, shown, size, geometry.grid).model_view(view.original)
    left, top, right, bottom = (round(v) for v in _to_tile(geometry.crop_box, shown, size))
    pixels = np.asarray(picture, dtype=np.float32)
    seen = np.zeros(pixels.shape[:2], dtype=bool)
    seen[max(0, top) : bottom, max(0, left) : right] = True
    pixels[~seen] = 0.35 * pixels[~seen] + 0.65 * 255  # faded towards white
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def _to_tile(box: tuple[float, float, float, float], shown: tuple[float, float, float, float],
             size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box in original pixels as pixels of a panel of ``size`` that shows ``shown``."""
    x0, y0, x1, y1 = shown
    kx, ky = size[0] / (x1 - x0), size[1] / (y1 - y0)
    return (box[0] - x0) * kx, (box[1] - y0) * ky, (box[2] - x0) * kx, (box[3] - y0) * ky


def _outline(pen: Canvas, origin: tuple[int, int], box: tuple[float, float, float, float], colour: Any, width: int,
             px: Any) -> None:
    """A box drawn on a panel at ``origin`` as a line of ``colour`` with a thin white line inside it, so that
    it shows on dark and light pixels alike."""
    width = max(1, width)
    x, y = origin
    outline = [x + box[0], y + box[1], x + box[2] - 1, y + box[3] - 1]
    pen.rectangle(outline, outline=colour, width=width)
    pen.rectangle([v + (width if i < 2 else -width) for i, v in enumerate(outline)], outline="white", width=max(1, px(1)))


__all__ = [
    "COLORMAP", "Figure", "FigureOptions", "Layout", "check_box_inside", "draw", "figure", "map_colours", "map_panel",
]
