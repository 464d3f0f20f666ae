"""Addresses of the viewer's page (``#pair=3&span=red%20dog&box=...``), and the caption and image as the page
shows them: what the viewer serves and what reports link to (evaluate's misses), in one place below both."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from xclip.core.geometry import Preprocessing
from xclip.core.tokens import CaptionTokens

DISPLAY_SIDE = 320  # the image as the page shows it: contours are found at this size


def view_link(pair: int, tokens: CaptionTokens, geometry: Preprocessing, *, span: tuple[int, int] | None = None,
              box: tuple[float, float, float, float] | None = None) -> str:
    """The page's address (its ``#`` fragment) of a pair, with the words of the caption's characters ``span``
    selected and a box of original-image pixels drawn, written as the page writes it (``viewLink`` in
    viewer.js): the span by its words, and ``at`` where those words occur more than once; the box in pixels of
    the image as the page shows it."""
    parts = [f"pair={pair}"]
    if span is not None:
        chips = caption_chips(tokens)
        rows = tokens.rows_overlapping(*span)
        first = next(k for k, chip in enumerate(chips) if rows[0] in chip["rows"])
        last = next(k for k, chip in enumerate(chips) if rows[-1] in chip["rows"])
        texts = [chip["text"] for chip in chips]
        words = " ".join(texts[first : last + 1])
        n_runs = sum(" ".join(texts[k : k + last - first + 1]) == words for k in range(len(chips)))
        parts.append(f"span={quote(words, safe='')}" + (f"&at={first}" if n_runs > 1 else ""))
    if box is not None:
        scale = DISPLAY_SIDE / geometry.input_size[0]
        (x0, y0), (x1, y1) = geometry.to_input(box[0], box[1]), geometry.to_input(box[2], box[3])
        shown = (DISPLAY_SIDE, round(DISPLAY_SIDE * geometry.input_size[1] / geometry.input_size[0]))
        corners = [min(max(round(v * scale), 0), shown[k % 2]) for k, v in enumerate((x0, y0, x1, y1))]
        parts.append("box=" + ",".join(str(v) for v in corners))
    return "#" + "&".join(parts)


def caption_chips(tokens: CaptionTokens) -> list[dict[str, Any]]:
    """The caption as the page shows it: its words (with their token rows) and its special tokens, in order."""
    chips = [{"text": word.text, "rows": word.rows, "special": False, "unknown": any(tokens.unknown[r] for r in word.rows)}
             for word in tokens.words()]
    chips += [{"text": token, "rows": [row], "special": True, "unknown": False}
              for row, (token, is_special) in enumerate(zip(tokens.tokens, tokens.special)) if is_special]
    return sorted(chips, key=lambda chip: chip["rows"][0])
