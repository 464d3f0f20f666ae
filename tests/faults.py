"""Fault injection for the crash tests, from outside the store: h5py opens every file opened for writing in
place (mode ``r+``, as a run's writer opens ``run.h5``) through a :class:`KillingFile`.

``python tests/faults.py N ARGS...`` runs ``xclip ARGS...`` with that file killing the process with SIGKILL inside
its N-th write; tests in the same process count a run's writes with :func:`writers_through`. Every process
started with tests/slow_writes on its ``PYTHONPATH`` writes run files through a :class:`SlowFile` (that
folder's ``sitecustomize``), for worker processes a test cannot reach otherwise.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py


class KillingFile(io.FileIO):
    """A file opened for writing in place that counts its writes, and whose ``kill_at``-th write writes half its
    bytes, then kills the process with SIGKILL, as a power cut or the OOM killer would, in the middle of a write."""

    def __init__(self, path: str | os.PathLike, kill_at: int | None = None) -> None:
        super().__init__(path, "r+")
        self.kill_at, self.n_writes = kill_at, 0

    def write(self, data: Any) -> int:
        self.n_writes += 1
        if self.n_writes == self.kill_at:
            view = memoryview(data).cast("B")
            super().write(view[: len(view) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write(data)


class SlowFile(io.FileIO):
    """A file opened for writing in place whose every write waits ``delay`` seconds first: a run on a tiny model
    then takes seconds per batch on any machine, long enough to be signalled while it runs (a batch of two
    inputs is about 20 writes)."""

    def __init__(self, path: str | os.PathLike, delay: float = 0.02) -> None:
        super().__init__(path, "r+")
        self.delay = delay

    def write(self, data: Any) -> int:
        time.sleep(self.delay)
        return super().write(data)


def writers_through(open_file: Callable[[Path], io.FileIO]) -> type[h5py.File]:
    """``h5py.File``, but a file named by its path and opened in mode ``r+`` is opened as ``open_file(path)``
    (h5py's file-object driver then does every write through it); to be set as ``h5py.File``."""

    class File(h5py.File):
        def __init__(self, name: Any, mode: str = "r", **options: Any) -> None:
            if mode == "r+" and isinstance(name, (str, os.PathLike)):
                name = open_file(Path(name))
            super().__init__(name, mode, **options)

    return File


def count_writes(action: Callable[[], Any]) -> int:
    """How many writes ``action()`` makes to run files opened for writing in place (through the same file object the
    fault injection uses, so that write N here is write N of ``python tests/faults.py N ...``)."""
    import pytest

    opened: list[KillingFile] = []

    def counted(path: Path) -> KillingFile:
        opened.append(KillingFile(path))
        return opened[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(h5py, "File", writers_through(counted))
        action()
    return sum(file.n_writes for file in opened)


if __name__ == "__main__":
    kill_at = int(sys.argv[1])
    h5py.File = writers_through(lambda path: KillingFile(path, kill_at))
    sys.argv = ["xclip", *sys.argv[2:]]
    from xclip.cli.app import main

    main()
