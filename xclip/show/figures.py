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
and PDF the same drawing is replayed through matplotlib's vector backends: text stays text, and the image, maps
and colour bars are embedded pixel for pixel as in the PNG.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from xclip.models.base import read_image
from xclip.show.colours import COLORMAP, Upsample, map_colours, map_panel, outline_mask
from xclip.errors import ConfigError
from xclip.core.geometry import Preprocessing
from xclip.attribution.inputs_read import caption_read, image_read, input_notes
from xclip.core.quadrature import DEFAULT_TOLERANCE
from xclip.attribution.result import InteractionMap, inexact_pair_note, is_inexact_pair
from xclip.store.schema import (
    CAPTION_INDEX,
    CAPTIONS,
    COMPLETENESS_ERROR,
    MAP_ERROR_BOUND,
    FOUR_TERM_VALUE,
    IMAGE_INDEX,
    IMAGES,
    IS_TRUNCATED,
    ORIGINAL_SIZE,
    PAIRS,
    SCORE,
)
from xclip.disk.files import no_space_error
from xclip.store.runfile import DONE, RunReader
from xclip.store.directory import FIGURE_MARK_KEY, FIGURES_FOLDER, figure_stem, pair_stem, slug
from xclip.core.tokens import CaptionTokens, check_span

FORMATS = ("png", "svg", "pdf")
PANEL_SIDE = 200  # the most a map panel's side is, in pixels at 100 DPI (2 in)
# words that get no panel of their own in per-word figures (they stay in the caption strip, coloured)
STOP_WORDS = frozenset(
    "a an the of on in at to and or with next by for from is are this that its it there here some".split()
)
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
# a map panel sums its patches; a word's total also has the CLS position, so that the words' totals and the
# special tokens' add up to the pair's four-term value
_WORD_TOTAL = "each coloured by its total with the image (its patches and CLS)"
_SEEN_WHOLE = 0.999  # a crop that keeps more of the image than this cut nothing worth drawing
_NOTHING = "the model gives this caption no interaction with the image: all values are 0"
CROP = (40, 40, 40)  # the outline of the crop on the whole image


@dataclass(frozen=True)
class PairView:
    """What a figure of one pair needs: from a run file (:func:`load_pair_view`) or an API result
    (:func:`pair_view`)."""

    title: str  # "pair 12", or what the caller names it
    name: str  # the start of the figures' file names: "pair000012"
    tokens: CaptionTokens  # the rows: the caption's positions as its text
    interactions: np.ndarray  # (n_tokens, n_image_positions), prefix (CLS) columns first
    geometry: Preprocessing  # where the columns' patches lie in the original image
    n_prefix: int
    image: Image.Image  # the model's view: the original's crop box resized to the input size
    score: float
    four_term_value: float
    completeness_error: float
    original: Image.Image | None = None  # the image as read, for the image panel to show what a crop cut off
    map_error_bound: float = math.nan  # relative to the map's own size (NaN: a fixed rule, no bound)
    tolerance: float | None = None  # the run's; a map whose bound passes it far is noted (result.is_inexact_pair)
    is_truncated: bool = False  # the caption was cut to the model's context: the figure marks the cut

    @property
    def caption(self) -> str:
        return self.tokens.caption

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    def patch_map(self, token_rows: Sequence[int]) -> np.ndarray:
        """``(H, W)``: the summed interactions of the given caption positions with every patch."""
        summed = self.interactions[list(token_rows)].sum(0)[self.n_prefix :]
        return summed.reshape(self.grid)

    def word_totals(self, patch_weights: np.ndarray | None = None) -> list[tuple[str, list[int], float]]:
        """Each caption word, its token rows, and its total interaction with the image (every position, CLS
        included, so the totals and the special tokens' add up to the score) or with the patches weighted by
        ``patch_weights`` (a box's coverage)."""
        if patch_weights is None:
            row_totals = self.interactions.sum(1)
        else:
            row_totals = self.interactions[:, self.n_prefix :] @ patch_weights
        return [(word.text, word.rows, float(row_totals[word.rows].sum())) for word in self.tokens.words()]


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
    drawn: tuple[tuple[Any, ...], ...] = ()  # what drew the picture, replayed for SVG and PDF (see _Canvas)

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
                _save_vector(self, temporary, kind, metadata)
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


def _is_skipped(word: str, skip_words: frozenset[str]) -> bool:
    """Whether a word gets no panel: a skip word, or punctuation unless every word is drawn (no skip words)."""
    is_punctuation = not any(ch.isalnum() for ch in word)
    return word.lower() in skip_words or (bool(skip_words) and is_punctuation)


def _quoted(words: Sequence[str]) -> str:
    """Words in quotes, so that punctuation among them reads as words: “a”, “,”, “and”."""
    return ", ".join(f"“{word}”" for word in dict.fromkeys(words))


# --- what a figure shows --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Content:
    name: str
    panels: list[tuple[str, np.ndarray]]  # (title, patch map)
    words: list[tuple[str, list[int], float]]  # the strip: word, token rows, value
    word_label: str  # what the strip's values are
    highlighted: list[int]  # token rows outlined in the strip
    box: tuple[float, float, float, float] | None
    notes: list[str]  # drawn under the figure
    warnings: list[str]  # drawn too, and told to whoever drew the figure
    input_warnings: list[str]  # the first of the warnings: about the pair's inputs (unknown words, a crop)


def _content(view: PairView, span: str | None, box: tuple[float, float, float, float] | None,
             skip_words: frozenset[str]) -> _Content:
    input_warnings = input_notes(caption_read(view.tokens, is_truncated=view.is_truncated), image_read(view.geometry))
    warnings = list(input_warnings)
    if not np.any(view.interactions):  # said instead of drawing a made-up scale
        warnings.append(_NOTHING)
    if is_inexact_pair(view.map_error_bound, view.tolerance):
        warnings.append(inexact_pair_note(view.map_error_bound))
    notes: list[str] = []
    stem = view.name
    if span is not None:
        rows = view.tokens.span_rows(span)
        label = view.tokens.label(rows)
        patch_map = view.patch_map(rows)
        return _Content(figure_stem(stem, span=label), [_panel(f"'{label}'", patch_map)],
                        view.word_totals(), _WORD_TOTAL, rows, box, notes, warnings, input_warnings)
    if box is not None:
        weights = view.geometry.box_coverage(box)
        words = view.word_totals(weights)
        total = float((view.interactions[:, view.n_prefix :] @ weights).sum())
        n_patches = int((weights > 0).sum())
        notes.append(f"the box covers {n_patches} patch{'es' if n_patches > 1 else ''} ({weights.sum():.3g} patches' area); "
                     f"its total with the caption: {total:+.3g}")
        outside = 1.0 - view.geometry.crop_share(box)
        if outside > 0:
            warnings.append(f"{outside:.0%} of the box lies outside the part of the image the model sees (the crop)")
        return _Content(figure_stem(stem, box=box), [], words,
                        "each coloured by its interaction with the box's patches", [], box, notes, warnings, input_warnings)
    words = view.word_totals()
    titled = [(_word_title(view.tokens, word, rows), rows) for word, rows, _ in words]
    panels = [_panel(title, view.patch_map(rows)) for (title, rows), (word, _, _) in zip(titled, words) if not _is_skipped(word, skip_words)]
    skipped = [word for word, _, _ in words if _is_skipped(word, skip_words)]
    if skipped:
        notes.append(f"no panel for {_quoted(skipped)} (stop-words and punctuation; drawing all words shows them)")
    if not panels:  # a caption of stop-words only: draw them rather than nothing
        panels = [_panel(title, view.patch_map(rows)) for title, rows in titled]
    return _Content(stem, panels, words, _WORD_TOTAL, [], None, notes, warnings, input_warnings)


def _word_title(tokens: CaptionTokens, word: str, rows: list[int]) -> str:
    """A word's panel title: the word, marked where the tokenizer did not know it (its map is the unknown token's)."""
    return f"{word} (unknown)" if any(tokens.unknown[row] for row in rows) else word


def _panel(label: str, patch_map: np.ndarray) -> tuple[str, np.ndarray]:
    """A map panel titled with what it draws: the sum over its patches."""
    return f"{label}: {patch_map.sum():+.3g}", patch_map


def _halfranges(content: _Content) -> tuple[float, float]:
    """The largest magnitude the map panels and the words show; 0 where all are 0 (no scale is drawn)."""
    map_range = max((float(np.abs(m).max()) for _, m in content.panels), default=0.0)
    word_range = max((abs(v) for _, _, v in content.words), default=0.0)
    return map_range, word_range


# --- drawing --------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _text_width(text: str, font: ImageFont.FreeTypeFont) -> float:
    return font.getlength(text)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` as the font measures them: broken at spaces, and inside a word
    longer than a line."""
    lines, line = [], ""
    for word in text.split():
        joined = f"{line} {word}" if line else word
        if _text_width(joined, font) <= width:
            line = joined
            continue
        if line:
            lines.append(line)
        while _text_width(word, font) > width:
            cut = _fitting(word, font, width)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return [*lines, line] if line or not lines else lines


def _fitting(text: str, font: ImageFont.FreeTypeFont, width: float) -> int:
    """How many leading characters of ``text`` fit in ``width`` (at least one)."""
    n = len(text)
    while n > 1 and _text_width(text[:n], font) > width:
        n -= 1
    return n


def _shortened(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, cut and ended with an ellipsis where it is wider than ``width``."""
    if _text_width(text, font) <= width:
        return text
    return text[: _fitting(text, font, width - _text_width("…", font))] + "…"


def _panel_title_fitting(title: str, font: ImageFont.FreeTypeFont, width: float) -> tuple[str, ImageFont.FreeTypeFont]:
    """A panel's ``label: value`` title within ``width``, and the font to draw it in: set down to four fifths of
    ``font``'s size where that makes it fit whole, else the label is shortened, never the value (a cut number
    would read as another number); the whole title is cut only where even the value does not fit."""
    for size in range(font.size, math.ceil(0.8 * font.size) - 1, -1):
        if _text_width(title, _font(size)) <= width:
            return title, _font(size)
    small = _font(math.ceil(0.8 * font.size))
    label, colon, value = title.rpartition(": ")
    room = width - _text_width(colon + value, small)
    if not colon or room < _text_width(label[:1] + "…", small):
        return _shortened(title, small, width), small
    return _shortened(label, small, room) + colon + value, small


class _Canvas:
    """Draws a figure onto a raster picture and records each call, so that SVG and PDF files get the same
    figure with its text as text (the record is replayed through matplotlib's vector backends)."""

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


def _save_vector(figure: Figure, path: Path, kind: str, metadata: dict[str, str]) -> None:
    """Replay the figure's drawing into matplotlib's SVG or PDF backend: text stays text (in DejaVu Sans,
    the font of the PNG), the maps and colour bars are embedded as the PNG's own pixels."""
    import matplotlib
    from matplotlib.figure import Figure as Page
    from matplotlib.patches import Rectangle

    width, height = figure.picture.size
    points = 72 / figure.dpi  # matplotlib measures text and lines in points
    # each picture embedded on its own, pixel for pixel, and fonts kept as text (TrueType in PDF)
    settings = {"svg.fonttype": "none", "pdf.fonttype": 42, "font.family": "DejaVu Sans", "image.composite_image": False}
    with matplotlib.rc_context(settings):
        page = Page(figsize=(width / figure.dpi, height / figure.dpi), dpi=figure.dpi)
        axes = page.add_axes((0, 0, 1, 1))
        for kind_, *item in figure.drawn:
            if kind_ == "image":
                (x, y), picture = item
                axes.imshow(np.asarray(picture), extent=(x, x + picture.size[0], y + picture.size[1], y),
                            interpolation="none", aspect="auto")  # "none": embedded as they are, not resampled
            elif kind_ == "text":
                (x, y), text, fill, size = item
                axes.text(x, y, text, color=_colour(fill), fontsize=size * points, va="top", ha="left")
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
        page.savefig(path, format=kind, metadata={"Title": figure.name, "Description" if kind == "svg" else "Subject": described})


def draw(view: PairView, *, span: str | None = None, box: tuple[float, float, float, float] | None = None,
         options: FigureOptions | None = None, layout: Layout | None = None) -> Figure:
    """One figure of a pair: the span's map (``span``), the box's interactions with the words (``box``), or a
    panel per content word (neither). ``layout`` (``"wide"`` or ``"column"``) replaces the options' layout."""
    options = _with_layout(options, layout)
    return _draw(view, _content(view, span, box, options.skip_words), options)


def _with_layout(options: FigureOptions | None, layout: Layout | None) -> FigureOptions:
    options = options or FigureOptions()
    return options if layout is None else replace(options, layout=layout)


def _draw(view: PairView, content: _Content, options: FigureOptions, halfranges: tuple[float, float] | None = None) -> Figure:
    """``halfranges`` (map, words) replaces the figure's own scales: ``render_run``'s ``scale="run"``.

    Laid out from the top: the header, the panels in rows (the image first) with the map colour bar on their
    right, the caption strip with its colour bar, the notes; each part measured before it is placed, so that
    no text meets another or leaves the page at any DPI, layout or image shape."""
    map_range, word_range = halfranges or _halfranges(content)
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
    title_font, text_font, small_font = (_font(px(size)) for size in page.fonts)
    margin, gap, title_h = px(14), px(10), _line(text_font)
    max_width = math.floor(page.max_width * options.dpi)

    # the panels: as large as fit beside the map colour bar, up to PANEL_SIDE
    bar_label = "per patch"
    bar_w = _vertical_bar_width(map_range, bar_label, small_font, px) if content.panels and map_range > 0 else 0
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
    header_lines = [line for text in header for line in _wrap(text, title_font, width - 2 * margin)]
    panels_top = margin + _line(title_font) * len(header_lines) + gap
    bar_h = max(px(100), block_h - title_h)
    bar_bottom = title_h + bar_h + px(10) + _line(small_font) * len(_under_bar(map_range, bar_label)) if bar_w else 0
    block_bottom = panels_top + max(block_h, bar_bottom)
    strip_label = _wrap(f"caption words, {content.word_label}:", small_font, width - 2 * margin)
    label_top = block_bottom + px(16)
    strip_top = label_top + _line(small_font) * len(strip_label) + px(4)
    strip = _layout_strip(content.words, text_font, width - 2 * margin, px)
    strip_h = (strip[-1][2] + px(22)) if strip else 0
    word_bar_top = strip_top + strip_h + px(10)
    has_word_bar = bool(strip) and word_range > 0
    notes_top = word_bar_top + (px(15) + _line(small_font) if has_word_bar else 0) + px(12)
    note_lines = [line for note in notes for line in _wrap(note, small_font, width - 2 * margin)]
    height = notes_top + _line(small_font) * len(note_lines) + margin

    pen = _Canvas((width, height))
    for n, line in enumerate(header_lines):
        pen.text((margin, margin + n * _line(title_font)), line, fill="black", font=title_font)
    for (x, y), slot, title, picture in zip(corners, slots, titles, pictures):
        x, y = margin + x, panels_top + y
        fitted, font = _panel_title_fitting(title, text_font, slot)
        pen.text((x, y), fitted, fill="black", font=font)
        pen.paste(picture, (x, y + title_h))
    image_at = (margin + corners[0][0], panels_top + corners[0][1] + title_h)
    if is_cut:
        _outline(pen, image_at, _to_tile(view.geometry.crop_box, shown, image_tile.size), CROP, px(2), px)
    if content.box is not None:
        _outline(pen, image_at, _to_tile(content.box, shown, image_tile.size), "black", px(3), px)
    if bar_w:
        _vertical_bar(pen, (margin + block_w + gap, panels_top + title_h), (px(14), bar_h), map_range, bar_label,
                      small_font, px)
    for n, line in enumerate(strip_label):
        pen.text((margin, label_top + n * _line(small_font)), line, fill="black", font=small_font)
    for (_, word_rows, value), (x, w, y, text) in zip(content.words, strip):
        colour = tuple(int(c) for c in map_colours(np.array(value), word_range or 1.0))
        bounds = [margin + x, strip_top + y, margin + x + w, strip_top + y + px(22)]
        is_highlighted = any(r in content.highlighted for r in word_rows)
        pen.rectangle(bounds, fill=colour, outline="black" if is_highlighted else (190, 190, 190), width=px(2) if is_highlighted else 1)
        light = sum(colour) / 3 > 110
        pen.text((bounds[0] + px(5), bounds[1] + px(3)), text, fill="black" if light else "white", font=text_font)
    if has_word_bar:
        _horizontal_bar(pen, (margin, word_bar_top), (min(px(220), width - 2 * margin - px(90)), px(10)), word_range,
                        small_font, px)
    for n, line in enumerate(note_lines):
        pen.text((margin, notes_top + n * _line(small_font)), line, fill=(90, 90, 90), font=small_font)
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
    if view.original is None or geometry.seen_share >= _SEEN_WHOLE:
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


def _outline(pen: _Canvas, origin: tuple[int, int], box: tuple[float, float, float, float], colour: Any, width: int,
             px: Any) -> None:
    """A box drawn on a panel at ``origin`` as a line of ``colour`` with a thin white line inside it, so that
    it shows on dark and light pixels alike."""
    width = max(1, width)
    x, y = origin
    outline = [x + box[0], y + box[1], x + box[2] - 1, y + box[3] - 1]
    pen.rectangle(outline, outline=colour, width=width)
    pen.rectangle([v + (width if i < 2 else -width) for i, v in enumerate(outline)], outline="white", width=max(1, px(1)))


def _line(font: ImageFont.FreeTypeFont) -> int:
    """The height of a line of text in ``font``."""
    return round(font.size * 1.35)


def _layout_strip(words: list[tuple[str, list[int], float]], font: ImageFont.FreeTypeFont, width: float,
                  px: Any) -> list[tuple[int, int, int, str]]:
    """(x, width, y, text) of each word's box, wrapped to ``width`` (a word wider than that is shortened)."""
    placed, x, y = [], 0, 0
    for word, _, _ in words:
        text = _shortened(word, font, width - px(10))
        w = round(_text_width(text, font)) + px(10)
        if x > 0 and x + w > width:
            x, y = 0, y + px(28)
        placed.append((x, w, y, text))
        x += w + px(6)
    return placed


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _tick_labels(halfrange: float, n_ticks: int) -> tuple[list[float], list[str], str]:
    """``n_ticks`` (5 or 3) values from ``-halfrange`` to ``+halfrange`` and their labels in one format: a true
    minus sign, as many decimals as two digits of the smallest need (less the trailing zeros all of them
    share), and, outside 0.01 to 9999, a power of ten the labels are given in ("×10⁻⁵"; else "")."""
    ticks = [-halfrange, -halfrange / 2, 0.0, halfrange / 2, halfrange] if n_ticks == 5 else [-halfrange, 0.0, halfrange]
    exponent = math.floor(math.log10(halfrange))
    power = 0 if -2 <= exponent <= 3 else exponent
    scaled = [tick / 10.0**power for tick in ticks]
    decimals = max(0, 1 - math.floor(math.log10(min(abs(v) for v in scaled if v))))
    texts = [f"{abs(v):.{decimals}f}" for v in scaled]
    while decimals > 0 and all(text.endswith("0") for text, v in zip(texts, scaled) if v):
        decimals -= 1
        texts = [f"{abs(v):.{decimals}f}" for v in scaled]
    labels = [("+" if v > 0 else "−") + text if v else "0" for v, text in zip(scaled, texts)]
    return ticks, labels, f"×10{str(power).translate(_SUPERSCRIPT)}" if power else ""


def _vertical_bar_width(halfrange: float, label: str, font: ImageFont.FreeTypeFont, px: Any) -> int:
    """How wide :func:`_vertical_bar` draws: the bar, its ticks and their labels, or the label under it."""
    texts = _tick_labels(halfrange, 5)[1]  # the widest labels: three ticks need no more decimals
    ticks = px(14) + px(8) + max(_text_width(text, font) for text in texts)
    return math.ceil(max(ticks, *(_text_width(line, font) for line in _under_bar(halfrange, label))))


def _vertical_bar(pen: _Canvas, origin: tuple[int, int], size: tuple[int, int],
                  halfrange: float, label: str, font: ImageFont.FreeTypeFont, px: Any) -> None:
    """The map colour bar, +halfrange at the top; ticks on its right (three where five would crowd), and under
    it ``label`` and the power of ten of the tick labels."""
    (x, y), (w, h) = origin, size
    values = np.linspace(halfrange, -halfrange, h)[:, None].repeat(w, 1)
    pen.paste(Image.fromarray(map_colours(values, halfrange)), (x, y))
    pen.rectangle([x, y, x + w, y + h], outline="black")
    ticks, texts, _ = _tick_labels(halfrange, 5 if h / 4 >= _line(font) else 3)
    top, bottom = font.getbbox("0")[1::2]  # where the digits lie below a text's origin
    for tick, text in zip(ticks, texts):
        ty = y + round((halfrange - tick) / (2 * halfrange) * (h - 1))
        pen.line([x + w, ty, x + w + px(4), ty], fill="black")
        # a gap between the tick mark and the label, so that the mark never reads as a minus sign
        pen.text((x + w + px(8), ty - (top + bottom) / 2), text, fill="black", font=font)
    for n, line in enumerate(_under_bar(halfrange, label)):
        pen.text((x, y + h + px(10) + n * _line(font)), line, fill="black", font=font)


def _under_bar(halfrange: float, label: str) -> list[str]:
    """The lines under the map colour bar: its label, and the power of ten of its tick labels if they have one."""
    power = _tick_labels(halfrange, 5)[2]
    return [label, power] if power else [label]


def _horizontal_bar(pen: _Canvas, origin: tuple[int, int], size: tuple[int, int],
                    halfrange: float, font: ImageFont.FreeTypeFont, px: Any) -> None:
    """The words' colour bar of ``size`` with its tick labels under it (three where five would touch) and
    their power of ten after it; ``origin`` is where its leftmost label may start."""
    (x, y), (w, h) = origin, size
    for n_ticks in (5, 3):
        ticks, texts, power = _tick_labels(halfrange, n_ticks)
        widths = [_text_width(text, font) for text in texts]
        spacing = (w - 1) / (n_ticks - 1)
        if all(spacing >= (a + b) / 2 + px(8) for a, b in zip(widths, widths[1:])):
            break
    x += math.ceil(widths[0] / 2)  # room for the first label, centred under the bar's end
    values = np.linspace(-halfrange, halfrange, w)[None, :].repeat(h, 0)
    pen.paste(Image.fromarray(map_colours(values, halfrange)), (x, y))
    pen.rectangle([x, y, x + w, y + h], outline="black")
    for tick, text, text_w in zip(ticks, texts, widths):
        tx = x + round((tick + halfrange) / (2 * halfrange) * (w - 1))
        pen.line([tx, y + h, tx, y + h + px(3)], fill="black")
        pen.text((tx - text_w / 2, y + h + px(5)), text, fill="black", font=font)
    if power:
        pen.text((x + w + widths[-1] / 2 + px(8), y + h + px(5)), power, fill="black", font=font)


# --- from the API and from run files ---------------------------------------------------------------------
def pair_view(result: InteractionMap, image: Image.Image | str | Path, *, title: str = "pair",
              tolerance: float | None = DEFAULT_TOLERANCE) -> PairView:
    """A :class:`PairView` of an API result: ``result`` from :func:`xclip.interaction_map` of a caption and
    ``image`` (the picture, or its file); ``tolerance``, the attribution's, for the inexact-map note."""
    if result.geometry is None or result.caption_tokens is None:
        msg = "the result's rows and columns are not a caption's tokens and an image's patches: draw caption-image maps (caption first, image second)"
        raise ConfigError(msg)
    picture = read_image(Path(image))[0] if isinstance(image, (str, Path)) else image
    return PairView(
        title=title, name=slug(title), tokens=result.caption_tokens,
        interactions=result.interactions.detach().double().cpu().numpy(), geometry=result.geometry,
        n_prefix=result.n_prefix, image=result.geometry.model_view(picture), score=result.score,
        four_term_value=result.four_term_value, completeness_error=result.completeness_error, original=picture,
        map_error_bound=result.map_error_bound, tolerance=tolerance, is_truncated=result.is_caption_truncated,
    )


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


def load_pair_view(run: RunReader, index: int, data_root: Path) -> PairView:
    c, i = run.pair_inputs(index)
    image_path = run.image_source(i, data_root, owner=f" of pair {index}")
    geometry = run.preprocessing(i)
    original = read_image(image_path)[0]
    return PairView(
        title=f"pair {index}",
        name=pair_stem(index),
        tokens=run.caption_tokens(c),
        interactions=run.interactions(index),
        geometry=geometry,
        n_prefix=run.n_prefix,
        image=geometry.model_view(original),
        score=float(run.value(PAIRS, SCORE, index)),
        four_term_value=float(run.value(PAIRS, FOUR_TERM_VALUE, index)),
        completeness_error=float(run.value(PAIRS, COMPLETENESS_ERROR, index)),
        map_error_bound=float(run.value(PAIRS, MAP_ERROR_BOUND, index)),
        tolerance=run.settings.attribution.tolerance,
        is_truncated=bool(run.value(CAPTIONS, IS_TRUNCATED, c)),
        # kept only where the image panel shows it (a crop cut part): render_run holds all views at once
        original=original if geometry.seen_share < _SEEN_WHOLE else None,
    )


@dataclass
class RenderReport:
    written: list[Path]
    skipped_without_span: int = 0  # pairs whose caption lacks the span (when no pairs were named)
    notes: list[str] = field(default_factory=list)  # the figures' warnings, "pair 3: ..."
    # of those, the ones about the pair's inputs (unknown words, a crop), which a run's summary also reports
    input_notes: list[str] = field(default_factory=list)
    # finished pairs after the last one drawn, left for the limit (with a span: not checked for it)
    n_beyond_limit: int = 0


def render_run(run_dir: str | Path, *, pairs: list[int] | None = None, span: str | None = None,
               box: tuple[float, float, float, float] | None = None, out: Path | None = None,
               options: FigureOptions | None = None, file_format: str = "png", limit: int = 100,
               data_root: Path | None = None, layout: Layout | None = None,
               progress: Callable[[int, int], None] | None = None) -> RenderReport:
    """Draw finished pairs of a run (also while it is still running) into ``out`` (default RUN_DIR/heatmaps).

    Named ``pairs`` must be finished, and hold the ``span``; otherwise the first ``limit`` finished pairs are
    drawn, skipping those whose caption lacks the span, and the report counts the pairs left beyond the limit
    (``n_beyond_limit``). ``data_root`` replaces the run's ``data.root`` when the images have moved since the
    run. ``layout`` (``"wide"`` or ``"column"``) replaces the options' layout. ``progress`` is called with the
    figures written and the number to write."""
    options = _with_layout(options, layout)
    if limit < 1:
        msg = f"limit must be at least 1, got {limit}"
        raise ConfigError(msg, setting="limit")
    if file_format not in FORMATS:
        msg = f"file_format must be one of {', '.join(FORMATS)}, got {file_format!r}"
        raise ConfigError(msg, setting="file_format")
    with RunReader(run_dir) as run:
        out = out or run.path.parent / FIGURES_FOLDER
        status = run.status(PAIRS)
        if pairs:
            for index in pairs:
                if not 0 <= index < len(status) or status[index] != DONE:
                    msg = f"pair {index} is not a finished pair of {run.path} (it has {len(status)} pairs)"
                    raise ConfigError(msg)
            candidates = list(pairs)
        else:
            candidates = [int(i) for i in np.flatnonzero(status == DONE)]
        report = RenderReport(written=[])
        if span is not None:
            check_span(span)
        if span is not None and not pairs:  # keep the pairs whose caption holds the span
            caption_index = run.column(PAIRS, CAPTION_INDEX)
            holds: dict[int, bool] = {}
            kept = []
            for position, index in enumerate(candidates):
                c = int(caption_index[index])
                if c not in holds:
                    try:
                        run.caption_tokens(c).span_rows(span)
                        holds[c] = True
                    except ConfigError:
                        holds[c] = False
                if holds[c]:
                    kept.append(index)
                elif len(kept) < limit:
                    report.skipped_without_span += 1
                if len(kept) == limit:  # the rest are counted, not read (a run's captions can be millions)
                    report.n_beyond_limit = len(candidates) - position - 1
                    break
            if not kept and candidates:
                msg = f"no finished pair's caption holds the span {span!r} ({len(candidates)} finished pairs)"
                raise ConfigError(msg, setting="span")
            candidates = kept
        selected = candidates if pairs else candidates[:limit]
        report.n_beyond_limit += len(candidates) - len(selected)
        if box is not None:
            sizes, image_index = run.column(IMAGES, ORIGINAL_SIZE), run.column(PAIRS, IMAGE_INDEX)
            for index in selected:
                check_box_inside(box, tuple(int(v) for v in sizes[int(image_index[index])]), f"pair {index}")  # type: ignore[arg-type]
        root = run.data_root(data_root)
        views = [load_pair_view(run, index, root) for index in selected]
    contents = [_content(view, span, box, options.skip_words) for view in views]
    halfranges = None
    if options.scale == "run":  # one scale for every figure of this call: the largest value any of them shows
        ranges = [_halfranges(content) for content in contents]
        halfranges = (max((r[0] for r in ranges), default=0.0), max((r[1] for r in ranges), default=0.0))
    for view, content in zip(views, contents):
        drawn = _draw(view, content, options, halfranges)
        report.written.append(drawn.save(out / f"{drawn.name}.{file_format}"))
        if progress is not None:
            progress(len(report.written), len(views))
        report.notes += [f"{view.title}: {warning}" for warning in drawn.warnings]
        report.input_notes += [f"{view.title}: {warning}" for warning in drawn.input_warnings]
    return report


__all__ = [
    "COLORMAP", "Figure", "FigureOptions", "Layout", "PairView", "RenderReport", "check_box_inside", "draw", "figure",
    "load_pair_view", "map_colours", "map_panel", "pair_view", "render_run",
]
