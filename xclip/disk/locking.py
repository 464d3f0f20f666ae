"""The writer lock of a run directory: one process writes it at a time.

The lock is an exclusive ``flock`` on ``.writer.lock``, taken in one atomic step and released by the kernel
when its process ends, however it ends; the holder's record (PID, host, start, command) is written inside it
so that a refused writer can name the holder. File systems without locks get an ``O_EXCL`` record instead.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from xclip.errors import RunUnavailable, StoreError
from xclip.disk.files import DISK_FULL

LOCK_FILE = ".writer.lock"
EXCLUSIVE_LOCK_FILE = ".writer.excl"  # the lock on file systems without file locks (see writer_lock)
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}  # flock's answers when another process holds the lock
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}  # NFS without a lock daemon, Lustre without -o flock


@contextmanager
def writer_lock(directory: Path, command: str = "") -> Iterator[None]:
    """Hold the run directory's writer lock: one ``xclip attribute`` or ``xclip merge`` per directory at a time.

    The lock is ``flock`` on ``directory/.writer.lock``: taking it is one atomic step, and the kernel releases it
    when its process ends, however it ends, so a lock is never stale and never taken over (a requeued Slurm job
    finds its dead predecessor's lock released). The holder then writes its record (PID, host, start time,
    command, Slurm job) into the file, and a refused process names that holder. A process only removes the lock
    file it holds. Readers (inspect, render, evaluate) never take the lock. A directory the lock created is
    removed again if the run left nothing in it.

    On NFS, Linux takes ``flock`` as an NFS lock held by the server, so it holds across hosts (a crashed host's
    lock ends with its lease), unless the mount has ``local_lock=flock`` or ``nolock``, which make locks local
    to each host. A file system without locks (``ENOLCK``, ``ENOSYS``, ``EOPNOTSUPP``: NFS without a lock daemon,
    Lustre without ``-o flock``) gets a record created with ``O_EXCL`` (``.writer.excl``) instead: atomic there
    too, but never released by the kernel, so a killed writer's record stays until it is deleted by hand.
    """
    is_new = not directory.exists()
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
    }
    release = _take_lock(directory, holder)
    try:
        yield
    finally:
        release()
        if is_new:
            with suppress(OSError):  # only an empty directory is removed: a run's files, or a next writer's lock, stay
                directory.rmdir()


@contextmanager
def update_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock for a read-modify-write of the small file ``path`` (a layout file), waiting while
    another process holds it: ``flock`` on ``.NAME.lock`` beside it. That file stays (removing it would let a
    waiting process lock a file no longer at the path). Yields whether the lock is held: False on a file system
    without locks, where concurrent updates keep the last one's contents."""
    descriptor = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            is_locked = True
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            is_locked = False
        yield is_locked
    finally:
        os.close(descriptor)  # closing releases the lock


def _lock_step(step: str) -> None:
    """Called between the lock's steps (``opened``, ``locked``, ``releasing``): the race tests pause here."""


def _take_lock(directory: Path, holder: dict[str, Any]) -> Callable[[], None]:
    """Take ``directory``'s writer lock for ``holder``, or refuse naming its holder; returns what releases it."""
    path = directory / LOCK_FILE
    cannot_hold_files = False
    for _ in range(100):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            msg = f"{directory} is a file, not a directory: a run directory holds run.h5 and its figures; choose another directory"
            raise RunUnavailable(msg) from None
        is_writable = True
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            # the holder before us removed the directory it had left empty: make it again; but a directory that is
            # still there and still has no room for a file is one files cannot be made in (/proc, a special mount)
            cannot_hold_files = directory.is_dir()
            continue
        except PermissionError:  # another user's lock file: it can still be locked (flock needs no write access)
            descriptor, is_writable = os.open(path, os.O_RDONLY), False
        try:
            _lock_step("opened")
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _lock_step("locked")
        except BaseException as e:
            os.close(descriptor)
            if isinstance(e, OSError) and e.errno in _HELD:
                raise _refusal(directory, path) from None
            if isinstance(e, OSError) and e.errno in _NO_LOCKS:
                return _take_exclusive_lock(directory, holder)
            raise
        if not _names(path, descriptor):
            # we locked a file that its holder removed while releasing it, after we had opened it: start over
            # on the file the path names now (see _release_lock)
            os.close(descriptor)
            continue
        if is_writable:  # (else the file keeps its last writer's record)
            _write_record(descriptor, holder)
        return functools.partial(_release_lock, path, descriptor)
    if cannot_hold_files:
        msg = f"{directory} cannot hold a run: no file can be created in it (creating {path} fails with 'No such file or directory'); choose another directory"
        raise RunUnavailable(msg)
    msg = f"cannot take the writer lock {path}: other processes keep taking and releasing it"
    raise StoreError(msg)


def _take_exclusive_lock(directory: Path, holder: dict[str, Any]) -> Callable[[], None]:
    """The lock on a file system without file locks: a record created with ``O_EXCL``, atomic on NFS too. It is
    never taken over, since that cannot be one atomic step without locks; a dead holder's record is deleted by
    hand, as the refusal says."""
    with suppress(OSError):  # the flock file just made: nobody can lock it here, and a record (size > 0) stays
        if (directory / LOCK_FILE).stat().st_size == 0:
            (directory / LOCK_FILE).unlink()
    path = directory / EXCLUSIVE_LOCK_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise _refusal(directory, path, is_kept=True) from None
    _write_record(descriptor, holder)
    return functools.partial(_release_lock, path, descriptor)


def _names(path: Path, descriptor: int) -> bool:
    """Whether ``path`` still names the open file ``descriptor``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _write_record(descriptor: int, holder: dict[str, Any]) -> None:
    """The holder's record, written once the lock is held (a killed holder's record stays in the file until the
    next holder writes its own over it; it never blocks anyone)."""
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        os.fsync(descriptor)
    except OSError as e:
        if e.errno not in DISK_FULL:  # a full disk is refused, with its message, when the run file is created
            raise


def _release_lock(path: Path, descriptor: int) -> None:
    """Remove the lock file, then unlock it (by closing it). Removing a file that other processes may have
    opened is safe because each checks, after locking, that the path still names the file it locked
    (:func:`_names`): one that locks the removed file after we close it starts over on the file the path names
    then, so two processes never both hold the lock of the file at the path. Only the file we hold is removed:
    if someone deleted it by hand and another writer made a new one, that one stays."""
    try:
        _lock_step("releasing")
        if _names(path, descriptor):
            path.unlink()
    finally:
        os.close(descriptor)


def _refusal(directory: Path, path: Path, *, is_kept: bool = False) -> RunUnavailable:
    """The refusal of a held lock, naming its holder from the record in ``path``."""
    current = _lock_holder(path) or {"pid": "?", "host": "?", "started": "just now", "command": ""}
    ending = (f"If that process is gone, delete {path} (this file system has no file locks, so its lock outlives it)"
              if is_kept else "The lock ends with that process, however it ends")
    msg = (
        f"{directory} is being written by process {current.get('pid')} on {current.get('host')} since "
        f"{current.get('started')} ({current.get('command') or 'xclip attribute'}): wait for it to finish or stop it "
        f"(its finished items are kept). {ending}"
    )
    return RunUnavailable(msg)


def _lock_holder(path: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or None when there is no readable record. A holder writes its record
    just after taking the lock, so an empty or half-written one is read again for up to half a second."""
    for _ in range(20):
        with suppress(OSError, ValueError):
            holder = json.loads(path.read_text())
            if isinstance(holder, dict) and "pid" in holder:
                return holder
        time.sleep(0.025)
    return None
