"""A caption's tokens as the caption's own text: words, spans and phrases from character offsets.

An adapter gives each token its character span in the caption and flags special tokens (BOS, EOS, padding)
and unknown ones; a run file stores both. Every reader groups tokens into words and finds spans from these,
never from a tokenizer's word marks or a table of special strings, so that a word the tokenizer does not
know is still shown as the caption wrote it. No model, no tokenizer, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xclip.errors import ConfigError


@dataclass(frozen=True)
class Word:
    """A caption word: its text as written, its token rows and its character span."""

    text: str
    rows: list[int]
    start: int
    end: int


@dataclass(frozen=True)
class CaptionTokens:
    """The positions of one caption's contributions (or of one row of a pair's map).

    Attributes:
        caption: the caption as given.
        tokens: the tokenizer's string of each position (how special tokens are shown).
        offsets: ``(start, end)`` character span of each position in ``caption``; ``(0, 0)`` where a token
            has none (special tokens).
        special: whether a position is a special token (BOS, EOS, padding), which no word contains.
        unknown: whether a position is the tokenizer's unknown token (its span still names the word).
    """

    caption: str
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]
    unknown: list[bool]

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not len(self.offsets) == len(self.special) == len(self.unknown) == n:
            msg = f"{n} tokens need as many offsets, special and unknown flags"
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.tokens)

    def text_of(self, row: int) -> str:
        """What a position stands for: its caption text, or its token string where it has no span."""
        start, end = self.offsets[row]
        return self.caption[start:end] if end > start else self.tokens[row]

    def words(self) -> list[Word]:
        """The caption's words in order, special tokens left out.

        Tokens join one word while each starts where the previous one ended; whitespace and punctuation
        (a token without letters or digits) end a word, so ``"dog,"`` is the words ``dog`` and ``,``.
        """
        words: list[Word] = []
        previous_end: int | None = None
        for row, ((start, end), is_special) in enumerate(zip(self.offsets, self.special)):
            if is_special:
                previous_end = None
                continue
            text = self.text_of(row)
            is_punctuation = not any(ch.isalnum() for ch in text)
            joins = (
                words and end > start and previous_end == start and not is_punctuation
                and any(ch.isalnum() for ch in words[-1].text)
            )
            if joins:
                last = words[-1]
                words[-1] = Word(self.caption[last.start : end], [*last.rows, row], last.start, end)
            else:
                words.append(Word(text, [row], start, end))
            previous_end = end if end > start else None
        return words

    def rows_overlapping(self, start: int, end: int) -> list[int]:
        """Positions whose character span overlaps ``[start, end)`` (special tokens have none)."""
        return [row for row, (a, b) in enumerate(self.offsets) if b > a and a < end and b > start]

    def span_rows(self, span: str) -> list[int]:
        """Positions of a span: token indices ``"2:4"`` / ``"3"``, or text of the caption (case-insensitive),
        which selects every token it overlaps.

        Raises:
            ConfigError: the span is empty, outside the caption's tokens, or not in the caption.
        """
        check_span(span)
        if re.fullmatch(r"\d+(:\d+)?", span):
            first, _, last = span.partition(":")
            rows = list(range(int(first), int(last) if last else int(first) + 1))
            if not rows or rows[-1] >= len(self):
                msg = f"span {span!r} is outside the caption's {len(self)} tokens"
                raise ConfigError(msg, setting="span")
            return rows
        begin = self.caption.lower().find(span.strip().lower())
        rows = self.rows_overlapping(begin, begin + len(span.strip())) if begin >= 0 else []
        if not rows:
            msg = f"span {span!r} does not occur in the caption {self.caption!r}"
            raise ConfigError(msg, setting="span")
        return rows

    def label(self, rows: list[int]) -> str:
        """The caption text the positions cover (their token strings where none has a span)."""
        spans = [self.offsets[r] for r in rows if self.offsets[r][1] > self.offsets[r][0]]
        if not spans:
            return " ".join(self.tokens[r] for r in rows)
        return self.caption[min(a for a, _ in spans) : max(b for _, b in spans)]

    def unknown_words(self) -> list[str]:
        """The caption text of every unknown token, in order, each once."""
        return list(self.unknown_tokens())

    def unknown_tokens(self) -> dict[str, str]:
        """Each word the tokenizer does not know (the caption's text, in order) with the token it reads instead."""
        return {self.text_of(row): self.tokens[row] for row, is_unknown in enumerate(self.unknown) if is_unknown}


def check_span(span: str) -> None:
    """Refuse an empty span (before any caption is looked at)."""
    if not span.strip():
        msg = "span is empty: give words of the caption (such as 'red dog') or token indices (such as 2:4)"
        raise ConfigError(msg, setting="span")
