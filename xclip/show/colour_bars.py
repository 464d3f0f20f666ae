"""A figure's two colour bars: the maps' (upright, beside the panels) and the caption words' (lying, under the
strip), with tick labels in one compact format."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageFont

from xclip.show.canvas import Canvas
from xclip.show.colours import map_colours
from xclip.show.text import line_height, text_width

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


def vertical_bar_width(halfrange: float, label: str, font: ImageFont.FreeTypeFont, px: Any) -> int:
    """How wide :func:`vertical_bar` draws: the bar, its ticks and their labels, or the label under it."""
    texts = _tick_labels(halfrange, 5)[1]  # the widest labels: three ticks need no more decimals
    ticks = px(14) + px(8) + max(text_width(text, font) for text in texts)
    return math.ceil(max(ticks, *(text_width(line, font) for line in under_bar(halfrange, label))))


def vertical_bar(pen: Canvas, origin: tuple[int, int], size: tuple[int, int],
                 halfrange: float, label: str, font: ImageFont.FreeTypeFont, px: Any) -> None:
    """The map colour bar, +halfrange at the top; ticks on its right (three where five would crowd), and under
    it ``label`` and the power of ten of the tick labels."""
    (x, y), (w, h) = origin, size
    values = np.linspace(halfrange, -halfrange, h)[:, None].repeat(w, 1)
    pen.paste(Image.fromarray(map_colours(values, halfrange)), (x, y))
    pen.rectangle([x, y, x + w, y + h], outline="black")
    ticks, texts, _ = _tick_labels(halfrange, 5 if h / 4 >= line_height(font) else 3)
    top, bottom = font.getbbox("0")[1::2]  # where the digits lie below a text's origin
    for tick, text in zip(ticks, texts):
        ty = y + round((halfrange - tick) / (2 * halfrange) * (h - 1))
        pen.line([x + w, ty, x + w + px(4), ty], fill="black")
        # a gap between the tick mark and the label, so that the mark never reads as a minus sign
        pen.text((x + w + px(8), ty - (top + bottom) / 2), text, fill="black", font=font)
    for n, line in enumerate(under_bar(halfrange, label)):
        pen.text((x, y + h + px(10) + n * line_height(font)), line, fill="black", font=font)


def under_bar(halfrange: float, label: str) -> list[str]:
    """The lines under the map colour bar: its label, and the power of ten of its tick labels if they have one."""
    power = _tick_labels(halfrange, 5)[2]
    return [label, power] if power else [label]


def horizontal_bar(pen: Canvas, origin: tuple[int, int], size: tuple[int, int],
                   halfrange: float, font: ImageFont.FreeTypeFont, px: Any) -> None:
    """The words' colour bar of ``size`` with its tick labels under it (three where five would touch) and
    their power of ten after it; ``origin`` is where its leftmost label may start."""
    (x, y), (w, h) = origin, size
    for n_ticks in (5, 3):
        ticks, texts, power = _tick_labels(halfrange, n_ticks)
        widths = [text_width(text, font) for text in texts]
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
