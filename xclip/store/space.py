"""The disk space a run file takes: its size from the declared columns before HDF5 writes a byte, the space
reserved once it is created, and a full disk as one message at every step of creating it."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xclip.disk.files import DISK_FULL, is_disk_full, no_space, size_text
from xclip.errors import StoreError
from xclip.store import schema
from xclip.store.schema import GROUPS, ROOT, RUN_FILE, STRING, RunInputs, RunKind, Sizes


def declared_bytes(inputs: RunInputs, sizes: Sizes, precision: str, kind: RunKind) -> int:
    """The bytes the fixed-size columns of such a run take: what HDF5 allocates for them when it creates them
    (a summary run's ``sizes`` give its ``n_top_cells``)."""
    return sum(column.n_bytes(group, inputs.n_rows(group), sizes, precision, kind)
               for group in (*GROUPS, ROOT) for column in schema.columns_of(group, kind)
               if column.dtype is not STRING)


def estimated_size(inputs: RunInputs, sizes: Sizes, precision: str, kind: RunKind) -> int:
    """The size of the run file of ``inputs``, before HDF5 writes a byte: its fixed-size columns exactly, and a
    margin (1 MB and 10 %) for the text given at creation and HDF5's own metadata. :func:`reserve` checks the
    real size after creation."""
    text = sum(len(str(value).encode()) + 16 for group in (*GROUPS, ROOT) for column in schema.columns_of(group, kind)
               if column.dtype is STRING and column.given is not None for value in column.given(inputs))
    return int(1.1 * (declared_bytes(inputs, sizes, precision, kind)
                      + text)) + 10**6


@contextmanager
def refusing_a_full_disk(path: Path, needed: int) -> Iterator[None]:
    """Create the file ``path`` inside, with a full disk as one :class:`StoreError` at every step: the
    ``needed`` space is checked before HDF5 writes a byte (on a disk with a few KB free HDF5 fails with raw
    messages, or crashes), a full disk while creating gives the same message, and a failed creation leaves no
    file behind."""
    target = path.parent / RUN_FILE
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise no_space(target, f"about {size_text(needed)}", free)
    is_ours = not path.exists()  # mode w- refuses an existing file: that one is not removed
    try:
        yield
    except BaseException as e:
        is_full = not isinstance(e, StoreError) and is_disk_full(e, path.parent)
        if is_ours:
            path.unlink(missing_ok=True)
        if is_full:
            raise no_space(target, f"about {size_text(needed)}") from e
        raise


def reserve(path: Path) -> None:
    """Reserve the file's disk space now, so that a full disk is found before any work is done, with the space
    it needs, and never in the middle of a write."""
    size = path.stat().st_size
    needed = max(0, size - path.stat().st_blocks * 512)  # what the file does not occupy yet
    free = shutil.disk_usage(path.parent).free
    if needed > free:  # refusing_a_full_disk removes the file it made when this fails
        raise no_space(path.parent / RUN_FILE, f"{size_text(size)} ({size_text(needed)} more)", free)
    if not hasattr(os, "posix_fallocate"):  # macOS: the free-space check above is all there is
        return
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise no_space(path.parent / RUN_FILE, f"{size_text(size)} ({size_text(needed)} more)") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without fallocate
            raise
    finally:
        os.close(descriptor)
