"""Text in figures: the font, measured as Pillow draws it, and text fitted to a width (wrapped, shortened, set
smaller), so that a figure's layout knows each text's size before it places it."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from PIL import ImageFont


@lru_cache(maxsize=16)
def dejavu_sans(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` pixels: matplotlib's font, which the SVG and PDF files name for their text."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def text_width(text: str, font: ImageFont.FreeTypeFont) -> float:
    return font.getlength(text)


def line_height(font: ImageFont.FreeTypeFont) -> int:
    """The height of a line of text in ``font``."""
    return round(font.size * 1.35)


def wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` as the font measures them: broken at spaces, and inside a word
    longer than a line."""
    lines, line = [], ""
    for word in text.split():
        joined = f"{line} {word}" if line else word
        if text_width(joined, font) <= width:
            line = joined
            continue
        if line:
            lines.append(line)
        while text_width(word, font) > width:
            cut = _fitting(word, font, width)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return [*lines, line] if line or not lines else lines


def _fitting(text: str, font: ImageFont.FreeTypeFont, width: float) -> int:
    """How many leading characters of ``text`` fit in ``width`` (at least one)."""
    n = len(text)
    while n > 1 and text_width(text[:n], font) > width:
        n -= 1
    return n


def shortened(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, cut and ended with an ellipsis where it is wider than ``width``."""
    if text_width(text, font) <= width:
        return text
    return text[: _fitting(text, font, width - text_width("…", font))] + "…"


def panel_title_fitting(title: str, font: ImageFont.FreeTypeFont, width: float) -> tuple[str, ImageFont.FreeTypeFont]:
    """A panel's ``label: value`` title within ``width``, and the font to draw it in: set down to four fifths of
    ``font``'s size where that makes it fit whole, else the label is shortened, never the value (a cut number
    would read as another number); the whole title is cut only where even the value does not fit."""
    for size in range(font.size, math.ceil(0.8 * font.size) - 1, -1):
        if text_width(title, dejavu_sans(size)) <= width:
            return title, dejavu_sans(size)
    small = dejavu_sans(math.ceil(0.8 * font.size))
    label, colon, value = title.rpartition(": ")
    room = width - text_width(colon + value, small)
    if not colon or room < text_width(label[:1] + "…", small):
        return shortened(title, small, width), small
    return shortened(label, small, room) + colon + value, small


def layout_strip(words: list[tuple[str, list[int], float]], font: ImageFont.FreeTypeFont, width: float,
                 px: Any) -> list[tuple[int, int, int, str]]:
    """(x, width, y, text) of each word's box, wrapped to ``width`` (a word wider than that is shortened)."""
    placed, x, y = [], 0, 0
    for word, _, _ in words:
        text = shortened(word, font, width - px(10))
        w = round(text_width(text, font)) + px(10)
        if x > 0 and x + w > width:
            x, y = 0, y + px(28)
        placed.append((x, w, y, text))
        x += w + px(6)
    return placed
