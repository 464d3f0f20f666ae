"""Files xclip writes, on a real disk: one message for a full disk at every stage and durable installation of a
finished file."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from xclip.errors import StoreError

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

