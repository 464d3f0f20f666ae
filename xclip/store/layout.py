"""The run file on disk, below its writer, reader and merges: opening it, allocating its datasets in place,
syncing it, encoding text to fixed lengths, and the checksums of its items (see :mod:`xclip.store.schema`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xclip.errors import RunUnavailable, StoreError
from xclip.store import schema
from xclip.store.schema import RUN_FILE, SCHEMA_VERSION

# HDF5's own file lock stays off for writers: xclip's writer lock (xclip.disk.locking) already admits one writer per run
# directory, and HDF5's lock fails outright where the file system has no locks (ENOLCK: NFS without a lock daemon),
# where xclip's lock falls back to its O_EXCL record. Passed to each h5py.File rather than set as
# HDF5_USE_FILE_LOCKING: an environment variable would change every HDF5 file of the user's process, and only works
# if set before HDF5 reads it. Readers open as plain h5py does (see open_for_reading).
HDF5_FILE_LOCKING = False


def fixed_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, fillvalue: Any = None) -> h5py.Dataset:
    """A dataset whose storage is allocated when it is created (contiguous, uncompressed): writing into it later
    changes no metadata of the file. Its fill value is recorded but not written: unfinished items hold zeros
    (their ``status`` says so) and the space is reserved by :func:`xclip.store.space.reserve` instead."""
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fillvalue, dcpl=plist)


def cut_utf8(text: str, size: int) -> bytes:
    """``text`` in at most ``size`` bytes of UTF-8, cut at a character boundary."""
    return text.encode()[:size].decode(errors="ignore").encode()


def run_file_path(run_dir: str | Path) -> Path:
    """The run file of a run directory; a path ending in ``.h5`` is taken as the file itself."""
    path = Path(run_dir)
    return path if path.suffix == ".h5" else path / RUN_FILE


def open_for_reading(path: Path) -> h5py.File:
    """Open an HDF5 file for reading with HDF5's default file locking, as a user's own ``h5py.File(path)`` does:
    HDF5 refuses to open one file twice in a process with different locking flags, so a reader that differed
    would break a notebook that also reads the run with plain h5py (or serves the viewer). Where the lock fails
    (ENOLCK), or the file is already open here without locking (a writer of this process), it opens without.
    Writers (xclip.disk.locking) take no HDF5 lock, so a reader's shared lock never blocks them."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", locking=False)


def open_run_file(path: Path, mode: str = "r") -> h5py.File:
    """Open ``run.h5``; a clear :class:`StoreError` for missing or damaged files."""
    if not path.is_file():
        msg = f"no run file at {path}"
        raise RunUnavailable(msg)
    try:
        f = open_for_reading(path) if mode == "r" else h5py.File(path, mode, locking=HDF5_FILE_LOCKING)
    except OSError as e:
        msg = f"cannot open {path} ({e}): it is not a run file, or it was damaged outside xclip (a full disk while it was being created, a failing disk): attribute it again with overwrite=True"
        raise StoreError(msg, setting="overwrite") from e
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        msg = f"{path} has schema version {version}, this xclip reads {SCHEMA_VERSION}: attribute it again with this version and overwrite=True"
        raise StoreError(msg, setting="overwrite")
    return f


def sync(f: h5py.File) -> None:
    f.flush()  # HDF5's buffers to the operating system
    if f.driver == "sec2":
        os.fsync(f.id.get_vfd_handle())  # and the operating system's to the disk


@contextmanager
def damaged_file_errors(path: Path) -> Iterator[None]:
    """h5py's errors while reading an open run file (a damaged heap or table) as one :class:`StoreError` naming
    the file; h5py raises them as ``OSError`` (without an errno), ``KeyError`` or ``RuntimeError``, without
    saying which file."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the operating system's (a full disk): not the file's
            raise
        if not _raised_by_h5py(e):
            raise
        msg = f"cannot read {path}: the file is damaged ({e}); a failing disk or an incomplete copy can do this"
        raise StoreError(msg) from e


def _raised_by_h5py(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and "h5py" in traceback.tb_frame.f_code.co_filename


def checksummed(f: h5py.File, group: str) -> list[str]:
    """The columns an item's checksum covers in ``group`` of this file, in the order it covers them."""
    return [column.name for column in schema.columns_of(group, schema.kind_of(f)) if column.is_checksummed]


def checksum(rows: Iterable[np.ndarray]) -> int:
    """CRC-32 of an item's rows' bytes as stored, one after the other."""
    crc = 0
    for row in rows:
        crc = zlib.crc32(np.ascontiguousarray(row).tobytes(), crc)
    return crc


def checked_rows(f: h5py.File, group: str, index: int, names: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """One item's rows of ``names`` and of every column its checksum covers, refused when those no longer match
    the checksum written with them (zeroed or altered bytes)."""
    covered = checksummed(f, group)
    items = f[group]
    rows = {name: items[name][index] for name in dict.fromkeys([*covered, *names])}
    if int(items[schema.CHECKSUM][index]) != checksum(rows[name] for name in covered):
        msg = (
            f"{f.filename}: {group} {index} is damaged (its stored results do not match their checksum: zeroed or "
            "altered bytes, a failing disk or an incomplete copy); attribute the run again with overwrite=True"
        )
        raise StoreError(msg, setting="overwrite")
    return rows


def checked_block(f: h5py.File, group: str, indices: np.ndarray, names: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """:func:`checked_rows` of several items at once, ``indices`` increasing: each column read once, as the rows
    from the first item to the last (so pass items that lie close together), every item checked."""
    covered = checksummed(f, group)
    items = f[group]
    first, last = int(indices[0]), int(indices[-1])
    picked = np.asarray(indices) - first
    rows = {name: items[name][first : last + 1][picked] for name in dict.fromkeys([*covered, schema.CHECKSUM, *names])}
    for k, index in enumerate(indices):
        if int(rows[schema.CHECKSUM][k]) != checksum(rows[name][k] for name in covered):
            msg = (
                f"{f.filename}: {group} {index} is damaged (its stored results do not match their checksum: zeroed or "
                "altered bytes, a failing disk or an incomplete copy); attribute the run again with overwrite=True"
            )
            raise StoreError(msg, setting="overwrite")
    return rows
