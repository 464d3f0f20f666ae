"""Writing a run's results into its file, safely against a kill at any instant.

Crash safety by design. The file is created complete (:mod:`xclip.store.create`), under a temporary name that is
renamed into place: every dataset at full size, its storage allocated at fixed offsets (no compression, no chunk
index, no string heap written during the run), and its disk space reserved. After that a run never changes the
file's structure, only bytes inside datasets, so a process killed at any instant, even inside a write, cannot
leave a file that does not open. Items are committed per batch: their data are written, flushed and fsynced, and
only then their ``status`` (0 pending, 1 done, 2 failed with the reason in ``error``). A kill loses at most the
batch in flight, whose items are still pending, and a rerun redoes them. See docs/run-file.md for the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import h5py
import numpy as np

from xclip.attribution.result import Contributions, PairNumbers
from xclip.disk.digests import FileIdentity
from xclip.store.layout import checksum, checksummed, cut_utf8, sync
from xclip.store.reader import RunReader
from xclip.store.schema import CAPTIONS, CHECKSUM, DONE, ERROR, FAILED, IMAGE_INDEX, IMAGES, PAIRS, PENDING, STATUS


class ImageSource(NamedTuple):
    """What a run stores of an image beside its results."""

    notes: Sequence[str]  # what was done to read it (EXIF orientation applied, ...)
    file: FileIdentity  # the file it was read from


class RunWriter(RunReader):
    """Write access for the one process that holds the directory's :func:`~xclip.disk.locking.writer_lock`:
    items' results, their failures, and per-batch commits (see the module's crash-safety notes)."""

    _mode = "r+"

    def pending(self, group: str) -> np.ndarray:
        """Indices of items not yet done (pending or failed items are retried by a rerun)."""
        return np.flatnonzero(self.status(group) != DONE)

    def redo_images(self, images: Sequence[int]) -> None:
        """Mark finished images pending again, with every pair that uses them (their files changed): the pairs
        first, so that a kill in between leaves an image done whose pairs are pending, which the next check of
        the files finds again."""
        if not len(images):
            return
        pairs = np.flatnonzero(np.isin(self.column(PAIRS, IMAGE_INDEX), np.asarray(images)))
        for group, indices in ((PAIRS, pairs), (IMAGES, np.sort(np.asarray(images)))):
            if len(indices):
                self._file[group][STATUS][indices] = np.full(len(indices), PENDING, dtype="i1")
            sync(self._file)

    def fail(self, group: str, index: int, reason: str) -> None:
        items = self._file[group]
        items[ERROR][int(index)] = cut_utf8(reason, items[ERROR].dtype.itemsize)
        items[STATUS][int(index)] = FAILED

    def write_captions(self, indices: Sequence[int], token_ids: Sequence[Sequence[int]], items: Sequence[Contributions]) -> None:
        self._write(CAPTIONS, indices, items, token_ids)

    def write_images(self, indices: Sequence[int], sources: Sequence[ImageSource], items: Sequence[Contributions]) -> None:
        self._write(IMAGES, indices, items, sources)

    def write_pairs(self, indices: Sequence[int], items: Sequence[PairNumbers],
                    summaries: Sequence[dict[str, np.ndarray]] | None = None) -> None:
        """Pairs' numbers (their maps too, in a run that stores maps); in a summary run also each pair's summary
        rows (:meth:`xclip.attribution.summary.PairSummaries.rows`)."""
        self._write(PAIRS, indices, items, [None] * len(items) if summaries is None else summaries)

    def _write(self, group: str, indices: Sequence[int], results: Sequence[Any], beside: Sequence[Any]) -> None:
        """Items' results, one write per column for the whole batch, with each item's checksum of its rows as
        stored; :meth:`commit` marks them done."""
        if not len(indices):
            return
        order = np.argsort(np.asarray(indices, dtype=np.int64), kind="stable")  # h5py writes increasing rows
        rows = np.asarray(indices, dtype=np.int64)[order]
        is_contiguous = rows[-1] - rows[0] + 1 == len(rows)
        selection: slice | np.ndarray = slice(int(rows[0]), int(rows[-1]) + 1) if is_contiguous else rows
        items = self._file[group]
        stored = {}
        for column in self.columns(group):
            if column.is_result:
                dataset = items[column.name]
                stored[column.name] = np.stack([_row(column.value(results[k], beside[k]), dataset, column.fill) for k in order])
                dataset[selection] = stored[column.name]
        covered = [stored[name] for name in checksummed(self._file, group)]
        items[CHECKSUM][selection] = np.array([checksum(column[k] for column in covered) for k in range(len(rows))], dtype="u4")

    def commit(self, group: str, indices: Sequence[int]) -> None:
        """Mark items done whose data were written: first the data reach the disk (flush, fsync), then the status
        does, so that a status never says done about data a kill lost."""
        if not len(indices):
            return
        sync(self._file)
        items = self._file[group]
        order = np.sort(np.asarray(indices, dtype=np.int64))
        items[ERROR][order] = np.zeros(len(order), dtype=items[ERROR].dtype)
        items[STATUS][order] = np.full(len(order), DONE, dtype="i1")
        self._file.flush()


def _row(value: Any, dataset: h5py.Dataset, fill: Any) -> np.ndarray:
    """``value`` as one row of ``dataset``: in its dtype (text UTF-8, cut at a character boundary to its size),
    padded with ``fill`` (zeros when None) past the item's own length."""
    row = np.zeros(dataset.shape[1:], dtype=dataset.dtype)
    if fill is not None:
        row[...] = fill
    if hasattr(value, "detach"):  # a tensor
        value = value.detach().double().cpu().numpy()
    elif dataset.dtype.kind == "S":
        size = dataset.dtype.itemsize
        value = np.array(cut_utf8(value, size) if isinstance(value, str) else [cut_utf8(text, size) for text in value], dtype=dataset.dtype)
    value = np.asarray(value)
    if value.size:
        row[tuple(slice(0, n) for n in value.shape)] = value
    return row


class WriteStep(NamedTuple):
    """One group's part of a batch: mark ``failed`` items failed, ``write()`` the results of ``written``, then
    commit them. ``write`` binds its arguments when it is made (a ``functools.partial``; a lambda would see the
    next batch's lists)."""

    group: str
    failed: Sequence[tuple[int, str]]
    written: Sequence[int]
    write: Callable[[], None]


class BackgroundWrites:
    """Stores a stage's batches from one background thread while the main thread computes the next batch, so
    that writing and fsyncing leave the critical path. One thread with one batch in flight keeps the store's
    order (a batch's data reach the disk before its status; a batch's steps are committed one after the other)
    and bounds the results held in memory to two batches. A failed write surfaces in the main thread at the next
    batch, or when the stage ends; the stage always waits for the batch in flight, so an interrupted run keeps
    every batch it computed."""

    def __init__(self, run: RunWriter, name: str) -> None:
        self.run, self.name = run, name
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"xclip-{name}-writes")
        self._in_flight: Future[None] | None = None

    def submit(self, failed: Sequence[tuple[int, str]], written: Sequence[int], write: Callable[[], None]) -> None:
        """One step of the group the writes are named after (see :class:`WriteStep`)."""
        self.submit_steps([WriteStep(self.name, failed, written, write)])

    def submit_steps(self, steps: Sequence[WriteStep]) -> None:
        """Store ``steps`` in their order, each committed before the next is written (inputs before the pairs
        that use them)."""
        self.wait()
        self._in_flight = self._thread.submit(self._store, list(steps))

    def _store(self, steps: list[WriteStep]) -> None:
        for step in steps:
            for index, reason in step.failed:
                self.run.fail(step.group, index, reason)
            step.write()
            self.run.commit(step.group, step.written)

    def wait(self) -> None:
        """Wait for the batch in flight; raises what its write raised."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def __enter__(self) -> BackgroundWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown()
