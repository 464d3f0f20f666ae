"""What a figure of a pair holds, before anything is drawn: its map panels (a caption span's, or one per content
word), the caption's words and the values they are coloured by, the box it outlines, and the notes and
warnings written under it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xclip.attribution.inputs_read import caption_read, image_read, input_notes
from xclip.attribution.result import inexact_pair_note, is_inexact_pair
from xclip.core.tokens import CaptionTokens
from xclip.show.pairs import PairView
from xclip.store.directory import figure_stem

# words that get no panel of their own in per-word figures (they stay in the caption strip, coloured)
STOP_WORDS = frozenset(
    "a an the of on in at to and or with next by for from is are this that its it there here some".split()
)
# a map panel sums its patches; a word's total also has the CLS position, so that the words' totals and the
# special tokens' add up to the pair's four-term value
_WORD_TOTAL = "each coloured by its total with the image (its patches and CLS)"
_NOTHING = "the model gives this caption no interaction with the image: all values are 0"


@dataclass(frozen=True)
class Content:
    name: str
    panels: list[tuple[str, np.ndarray]]  # (title, patch map)
    words: list[tuple[str, list[int], float]]  # the strip: word, token rows, value
    word_label: str  # what the strip's values are
    highlighted: list[int]  # token rows outlined in the strip
    box: tuple[float, float, float, float] | None
    notes: list[str]  # drawn under the figure
    warnings: list[str]  # drawn too, and told to whoever drew the figure
    input_warnings: list[str]  # the first of the warnings: about the pair's inputs (unknown words, a crop)


def figure_content(view: PairView, span: str | None, box: tuple[float, float, float, float] | None,
                   skip_words: frozenset[str]) -> Content:
    """The figure of ``view``'s ``span`` (its map), of its ``box`` (the box's interactions with the words), or,
    with neither, a panel per word that is not in ``skip_words``."""
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
        return Content(figure_stem(stem, span=label), [_panel(f"'{label}'", patch_map)],
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
        return Content(figure_stem(stem, box=box), [], words,
                       "each coloured by its interaction with the box's patches", [], box, notes, warnings, input_warnings)
    words = view.word_totals()
    titled = [(_word_title(view.tokens, word, rows), rows) for word, rows, _ in words]
    panels = [_panel(title, view.patch_map(rows)) for (title, rows), (word, _, _) in zip(titled, words) if not _is_skipped(word, skip_words)]
    skipped = [word for word, _, _ in words if _is_skipped(word, skip_words)]
    if skipped:
        notes.append(f"no panel for {_quoted(skipped)} (stop-words and punctuation; drawing all words shows them)")
    if not panels:  # a caption of stop-words only: draw them rather than nothing
        panels = [_panel(title, view.patch_map(rows)) for title, rows in titled]
    return Content(stem, panels, words, _WORD_TOTAL, [], None, notes, warnings, input_warnings)


def halfranges_of(content: Content) -> tuple[float, float]:
    """The largest magnitude the map panels and the words show; 0 where all are 0 (no scale is drawn)."""
    map_range = max((float(np.abs(m).max()) for _, m in content.panels), default=0.0)
    word_range = max((abs(v) for _, _, v in content.words), default=0.0)
    return map_range, word_range


def _is_skipped(word: str, skip_words: frozenset[str]) -> bool:
    """Whether a word gets no panel: a skip word, or punctuation unless every word is drawn (no skip words)."""
    is_punctuation = not any(ch.isalnum() for ch in word)
    return word.lower() in skip_words or (bool(skip_words) and is_punctuation)


def _quoted(words: Sequence[str]) -> str:
    """Words in quotes, so that punctuation among them reads as words: “a”, “,”, “and”."""
    return ", ".join(f"“{word}”" for word in dict.fromkeys(words))


def _word_title(tokens: CaptionTokens, word: str, rows: list[int]) -> str:
    """A word's panel title: the word, marked where the tokenizer did not know it (its map is the unknown token's)."""
    return f"{word} (unknown)" if any(tokens.unknown[row] for row in rows) else word


def _panel(label: str, patch_map: np.ndarray) -> tuple[str, np.ndarray]:
    """A map panel titled with what it draws: the sum over its patches."""
    return f"{label}: {patch_map.sum():+.3g}", patch_map
