"""What a run directory holds, named in one place: the run file, the figures folder and the figures' file names
(those ``xclip render`` gives, and which of them ``overwrite`` may delete)."""

from __future__ import annotations

import re
from contextlib import suppress
from pathlib import Path

from xclip.store.schema import RUN_FILE

FIGURES_FOLDER = "heatmaps"
# every figure's metadata (PNG text, SVG description, PDF subject) holds this key: what marks a file as xclip's figure
FIGURE_MARK_KEY = "xclip:halfrange"
_FIGURE = r"pair\d{6,}(_span-[0-9a-z-]+|_box-[0-9a-z-]+)?\.(png|svg|pdf)"
_FIGURE_NAME = re.compile(_FIGURE)
_FIGURE_TEMPORARY = re.compile(rf"\.{_FIGURE}\.tmp-\d+-[0-9a-f]+")


def slug(text: str) -> str:
    """``text`` as a file-name part: lower-case letters and digits joined by ``-``."""
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-") or "tokens"


def pair_stem(index: int) -> str:
    """The file name, without suffix, of a stored pair's figure: ``pair000012``."""
    return f"pair{index:06d}"


def figure_stem(stem: str, *, span: str | None = None, box: tuple[float, ...] | None = None) -> str:
    """The file name, without suffix, of a figure of one span or one box: ``pair000012_span-red-dog`` (the span's
    words), ``pair000012_box-0-0-10-10`` (the box's corners); ``stem`` itself for the whole caption."""
    if span is not None:
        return f"{stem}_span-{slug(span)}"
    if box is not None:
        return f"{stem}_box-{slug(' '.join(f'{v:g}' for v in box))}"
    return stem


def is_xclip_figure(path: Path) -> bool:
    """Whether ``path`` is a figure xclip drew: its name is one xclip gives, and the file carries xclip's mark
    (a temporary of a killed render, named as only xclip names them, needs no mark)."""
    if path.is_symlink() or not path.is_file():
        return False
    if _FIGURE_TEMPORARY.fullmatch(path.name):
        return True
    return bool(_FIGURE_NAME.fullmatch(path.name)) and FIGURE_MARK_KEY.encode() in path.read_bytes()


def remove_run_outputs(directory: Path) -> None:
    """What ``overwrite`` deletes: the run file (and a temporary one), the figures xclip drew into ``heatmaps/``,
    then ``heatmaps/`` if that left it empty. Everything else, a user's own figures and notes, stays."""
    for name in (RUN_FILE, RUN_FILE + ".tmp"):
        (directory / name).unlink(missing_ok=True)
    figures = directory / FIGURES_FOLDER
    if figures.is_dir() and not figures.is_symlink():
        for path in figures.iterdir():
            if is_xclip_figure(path):
                path.unlink(missing_ok=True)
        with suppress(OSError):  # only an empty folder is removed
            figures.rmdir()
