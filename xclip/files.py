"""Files xclip writes, on a real disk: one message for a full disk at every stage, durable installation of a
finished file, and knowing which files of a run directory xclip wrote (what ``overwrite`` may delete)."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from xclip.errors import StoreError
from xclip.schema import RUN_FILE

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}  # the errnos of a full disk or quota
_ALMOST_FULL = 10**6  # bytes: HDF5 fails without an errno; with less than this free, a full disk is the cause


def no_space(target: Path, needed: str | None = None, free: int | None = None, *,
              advice: str = "free space, or choose another output.directory, then rerun") -> StoreError:
    """The one message of a full disk, at every stage: what was to be written, what it needs, and the disk."""
    folder = next(p for p in [target.parent, *target.parents] if p.exists())
    mount = next((p for p in [folder, *folder.parents] if os.path.ismount(p)), folder)
    free = shutil.disk_usage(folder).free if free is None else free
    needs = f": it needs {needed}, and" if needed else ":"
    return StoreError(f"not enough disk space for {target}{needs} the disk at {mount} has {size_text(free)} free: {advice}")


def no_space_error(target: Path) -> StoreError:
    """A full disk while writing ``target`` (a figure) as one :class:`StoreError` naming it and its disk."""
    return no_space(target, advice="free space, or choose another output folder, then rerun")


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` came from a full disk: the system says so (``ENOSPC``, ``EDQUOT``), or HDF5 failed (its
    errors carry no errno) while the disk has almost nothing left."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in DISK_FULL
    if isinstance(error, (OSError, RuntimeError, ValueError)):
        with suppress(OSError):
            return shutil.disk_usage(folder).free < _ALMOST_FULL
    return False


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def install_file(temporary: Path, target: Path) -> None:
    """Rename a finished ``temporary`` file to ``target`` durably: its bytes reach the disk before the rename
    (else a power cut can leave ``target`` naming an empty or partial file), and the directory's new entry
    reaches it after."""
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, target)
    descriptor = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # file systems whose directories cannot be synced
            raise
    finally:
        os.close(descriptor)


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` a file under a temporary name in ``target``'s folder, then install it as ``target``
    (:func:`install_file`): a failed write, a full disk, leaves an earlier ``target`` as it was.

    Raises:
        StoreError: the write failed with an OSError (naming ``target``, and the disk when it is full).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(temporary)
        install_file(temporary, target)
    except BaseException as e:
        temporary.unlink(missing_ok=True)
        if isinstance(e, OSError):
            if is_disk_full(e, target.parent):
                raise no_space(target, advice="free space, then rerun") from e
            msg = f"cannot write {target}: {e.strerror or e}"
            raise StoreError(msg) from e
        raise
    return target


def write_text_atomically(target: Path, text: str) -> Path:
    """:func:`write_atomically` of UTF-8 text."""
    return write_atomically(target, lambda temporary: temporary.write_text(text, encoding="utf-8"))


# what --overwrite deletes of heatmaps/: the figures render names (render._content: pair000012.png,
# pair000012_span-red-dog.svg, pair000012_box-0-0-10-10.pdf), and Figure.save's temporaries of a killed render
_FIGURE = r"pair\d{6,}(_span-[0-9a-z-]+|_box-[0-9a-z-]+)?\.(png|svg|pdf)"
_FIGURE_NAME = re.compile(_FIGURE)
_FIGURE_TEMPORARY = re.compile(rf"\.{_FIGURE}\.tmp-\d+-[0-9a-f]+")
_FIGURE_MARK = b"xclip:halfrange"  # every figure's metadata (PNG text, SVG description, PDF subject) holds it


def is_xclip_figure(path: Path) -> bool:
    """Whether ``path`` is a figure xclip drew: its name is one xclip gives, and the file carries xclip's mark
    (a temporary of a killed render, named as only xclip names them, needs no mark)."""
    if path.is_symlink() or not path.is_file():
        return False
    if _FIGURE_TEMPORARY.fullmatch(path.name):
        return True
    return bool(_FIGURE_NAME.fullmatch(path.name)) and _FIGURE_MARK in path.read_bytes()


def remove_run_outputs(directory: Path) -> None:
    """What ``overwrite`` deletes: the run file (and a temporary one), the figures xclip drew into ``heatmaps/``,
    then ``heatmaps/`` if that left it empty. Everything else, a user's own figures and notes, stays."""
    for name in (RUN_FILE, RUN_FILE + ".tmp"):
        (directory / name).unlink(missing_ok=True)
    figures = directory / "heatmaps"
    if figures.is_dir() and not figures.is_symlink():
        for path in figures.iterdir():
            if is_xclip_figure(path):
                path.unlink(missing_ok=True)
        with suppress(OSError):  # only an empty folder is removed
            figures.rmdir()
