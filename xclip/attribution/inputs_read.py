"""What the model read of each input, described once for every reader (figures, ``inspect``, ``explain``, the
viewer, ``evaluate``'s report).

A caption is read up to the model's context: the tokens it read end at a character of the caption, and the rest
is in no map. Words the tokenizer does not know are read as its unknown token. An image is read as the part its
preprocessing kept (the crop box). Each description builds its notes here, so that every reader words them alike.
Pure Python over stored values: no model, no tokenizer, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xclip.core.geometry import Box, Preprocessing
    from xclip.core.tokens import CaptionTokens

# a crop that cut more than this share of the image is noted
SMALL_CUT = 0.05
# the unread rest of a caption is quoted up to this many characters in a note
QUOTED_REST = 60


@dataclass(frozen=True)
class CaptionRead:
    """What the model read of one caption.

    Attributes:
        caption: the caption as given.
        is_truncated: the caption was longer than the model's context, which cut it.
        n_tokens_read: the caption's own tokens the model read (special tokens left out).
        read_end: the model read ``caption[:read_end]``; the rest is in no map.
        unknown: each word the tokenizer does not know, with the token it read instead.
    """

    caption: str
    is_truncated: bool
    n_tokens_read: int
    read_end: int
    unknown: dict[str, str]

    @property
    def read_text(self) -> str:
        """The part of the caption the model read."""
        return self.caption[: self.read_end]

    @property
    def unread_text(self) -> str:
        """The part of the caption the model did not read ("" unless truncated)."""
        return self.caption[self.read_end :].strip() if self.is_truncated else ""

    @property
    def n_words(self) -> int:
        """The caption's words (separated by whitespace)."""
        return len(self.caption.split())

    @property
    def n_words_read(self) -> int:
        """The words the model read, a word it read only the start of included."""
        return len(self.read_text.split())

    def truncation_note(self) -> str | None:
        """What a reader says of a truncated caption; None for one read whole."""
        if not self.is_truncated:
            return None
        rest = self.unread_text
        quoted = rest if len(rest) <= QUOTED_REST else rest[:QUOTED_REST].rstrip() + "…"
        return (f"the model read the first {self.n_tokens_read} tokens of this caption ({self.n_words_read} of its "
                f"{self.n_words} words; its context ends there): the rest, “{quoted}”, is not in this map")

    def unknown_note(self) -> str | None:
        """What a reader says of words the tokenizer does not know; None where it knows them all."""
        if not self.unknown:
            return None
        pairs = ", ".join(f"“{word}” → {token}" for word, token in self.unknown.items())
        panel = ("its panel shows the unknown token, not the word" if len(self.unknown) == 1
                 else "their panels show the unknown token, not the words")
        return f"{', '.join(self.unknown)}: unknown to the tokenizer ({pairs}); {panel}"

    def notes(self) -> list[str]:
        return [note for note in (self.truncation_note(), self.unknown_note()) if note]

    def to_dict(self) -> dict[str, object]:
        return {"is_truncated": self.is_truncated, "n_tokens_read": self.n_tokens_read, "read_end": self.read_end,
                "n_words": self.n_words, "n_words_read": self.n_words_read, "unread": self.unread_text,
                "unknown_words": list(self.unknown)}


@dataclass(frozen=True)
class ImageRead:
    """What the model saw of one image.

    Attributes:
        original_size: ``(width, height)`` of the image as read (upright).
        crop_box: the rectangle of the original, in its pixels, that the model's input shows.
        seen_share: the share of the original's area inside the crop box.
        resize: how the image was made square (``native``, ``crop``, ``pad``, ``squash``); None where unknown.
        notes: what was done to read it (EXIF orientation applied, transparency composited).
    """

    original_size: tuple[int, int]
    crop_box: Box
    seen_share: float
    resize: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_cut(self) -> bool:
        """The crop cut more than a small share of the image (:data:`SMALL_CUT`)."""
        return self.seen_share < 1 - SMALL_CUT

    def crop_note(self) -> str | None:
        """How much of the image the model saw, where its crop cut more than a small share; None otherwise."""
        if not self.is_cut:
            return None
        (width, height), (x0, y0, x1, y1) = self.original_size, self.crop_box
        is_centred = abs(x0 + x1 - width) <= 2 and abs(y0 + y1 - height) <= 2
        where = f"the centre {self.seen_share:.0%}" if is_centred else f"{self.seen_share:.0%}"
        return (f"the model saw {where} of this image (crop {x1 - x0:.0f} x {y1 - y0:.0f} of {width} x {height}): "
                "the maps cover only the crop, the rest of the image is in no map")

    def to_dict(self) -> dict[str, object]:
        return {"original_size": list(self.original_size), "crop_box": [float(v) for v in self.crop_box],
                "seen_share": self.seen_share, "resize": self.resize, "notes": list(self.notes)}


def caption_read(tokens: CaptionTokens, *, is_truncated: bool) -> CaptionRead:
    """What the model read of a caption, from its stored tokens and truncation flag."""
    ends = [end for (start, end), special in zip(tokens.offsets, tokens.special) if not special and end > start]
    n_read = sum(not special for special in tokens.special)
    read_end = max(ends, default=0) if is_truncated else len(tokens.caption)
    return CaptionRead(tokens.caption, is_truncated, n_read, read_end, tokens.unknown_tokens())


def image_read(geometry: Preprocessing, *, resize: str | None = None, notes: str = "") -> ImageRead:
    """What the model saw of an image, from its stored preprocessing, the run's resize and its stored notes
    (``"; "``-separated)."""
    return ImageRead(geometry.original_size, geometry.crop_box, geometry.seen_share, resize,
                     tuple(note for note in notes.split("; ") if note))


def input_notes(caption: CaptionRead, image: ImageRead) -> list[str]:
    """The notes every reader shows of a pair's inputs, in order: truncation, unknown words, the crop."""
    return [note for note in (*caption.notes(), image.crop_note()) if note]
