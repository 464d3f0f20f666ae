"""UTF-8 text files read the way every reader of user files needs: a file that cannot be read, and bytes that are
not UTF-8, become a :class:`ConfigError` naming the file and the line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from xclip.errors import ConfigError


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        msg = f"cannot read {what} {path}: {e.strerror or e}"
        raise ConfigError(msg) from e


def text_lines(path: Path, what: str) -> Iterator[tuple[int, str | None, str]]:
    """``(line number, text, problem)`` of each non-blank line, split on ``\\n`` only: U+2028, U+0085 and other
    Unicode line breaks are characters of a record, not ends of lines. A line that is not UTF-8 comes with
    text None and the problem."""
    data = _read_bytes(path, what)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write: not part of the text
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def read_text(path: Path, what: str) -> str:
    """A whole file as UTF-8 text; a :class:`ConfigError` naming the line of the first byte that is not."""
    data = _read_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        msg = f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        raise ConfigError(msg) from None
