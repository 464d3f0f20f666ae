"""The HDF5 file of a run directory: flat, item-indexed datasets that plain h5py users can read.

Crash safety by design. The file is created complete, under a temporary name that is renamed into place: every
dataset at full size, its storage allocated at fixed offsets (no compression, no chunk index, no string heap
written during the run), and its disk space reserved. After that a run never changes the file's structure,
only bytes inside datasets, so a process killed at any instant, even inside a write, cannot leave a file that
does not open. Items are committed per batch: their data are written, flushed and fsynced, and only then their
``status`` (0 pending, 1 done, 2 failed with the reason in ``error``). A kill loses at most the batch in flight,
whose items are still pending, and a rerun redoes them. See the README for the table.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import shutil
import signal
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import h5py
import numpy as np

from xclip.store import schema
from xclip.disk.digests import FileIdentity, has_changed
from xclip.errors import ConfigError, RunUnavailable, StoreError
from xclip.disk.files import DISK_FULL, install_file, is_disk_full, no_space, size_text
from xclip.disk.locking import writer_lock
from xclip.core.geometry import Preprocessing
from xclip.attribution.result import Contributions, PairNumbers
from xclip.store.schema import RUN_FILE, SCHEMA_VERSION, Status
from xclip.core.tokens import CaptionTokens

if TYPE_CHECKING:
    from xclip.config import RunConfig

PENDING, DONE, FAILED = Status.PENDING, Status.DONE, Status.FAILED
_STRING = h5py.string_dtype()  # variable length: only for text written when the file is created
# text written during a run is fixed-length UTF-8 (cut at a character boundary), so that it is stored in place
_ERROR = h5py.string_dtype("utf-8", 400)
_PAIR_ERROR = h5py.string_dtype("utf-8", 100)  # "caption 3 failed: ..." (the input's own error has the rest)
_NOTE = h5py.string_dtype("utf-8", 200)
_TOKEN = h5py.string_dtype("utf-8", 48)
# fault injection for the crash tests: SIGKILL this process inside the N-th write to run.h5 after it opens
# HDF5's own file lock stays off for writers: xclip's writer lock (xclip.disk.locking) already admits one writer per run
# directory, and HDF5's lock fails outright where the file system has no locks (ENOLCK: NFS without a lock daemon),
# where xclip's lock falls back to its O_EXCL record. Passed to each h5py.File rather than set as
# HDF5_USE_FILE_LOCKING: an environment variable would change every HDF5 file of the user's process, and only works
# if set before HDF5 reads it. Readers open as plain h5py does (see _open_for_reading).
_HDF5_FILE_LOCKING = False
_KILL_AT_WRITE = "XCLIP_TEST_KILL_AT_WRITE"


def _fixed(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, fillvalue: Any = None) -> h5py.Dataset:
    """A dataset whose storage is allocated when it is created (contiguous, uncompressed): writing into it later
    changes no metadata of the file. Its fill value is recorded but not written: unfinished items hold zeros
    (their ``status`` says so) and the space is reserved by :func:`_reserve` instead."""
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fillvalue, dcpl=plist)


def _status(group: h5py.Group, n: int, error: Any = _ERROR) -> None:
    _fixed(group, "status", (n,), "i1", PENDING)
    _fixed(group, "error", (n,), error)


def _utf8(text: str, size: int) -> bytes:
    """``text`` in at most ``size`` bytes of UTF-8, cut at a character boundary."""
    return text.encode()[:size].decode(errors="ignore").encode()


def _estimated_size(arguments: dict[str, Any]) -> int:
    """The size of the file :func:`create_run_file` makes from ``arguments``, before HDF5 writes a byte: its large
    datasets exactly, and a margin (1 MB, 10 % and 1 KB an item) for the small ones, the text and HDF5's own
    metadata. :func:`_reserve` checks the real size after creation."""
    array = {"float64": 8, "float32": 4, "float16": 2}[arguments["precision"]]
    number = 8 if arguments["precision"] == "float64" else 4
    n_text, n_image, width = arguments["max_text_positions"], arguments["n_image_positions"], arguments["embedding_dim"]
    per_caption = n_text * (width * array + 4 + _TOKEN.itemsize + 8 + 2) + 2 * width * number + _ERROR.itemsize
    per_image = n_image * width * array + 2 * width * number + _NOTE.itemsize + _ERROR.itemsize
    per_pair = (n_text * n_image * array if arguments["store_pair_maps"] else 0) + 16 + 10 * number + _PAIR_ERROR.itemsize
    n_captions, n_images, n_pairs = len(arguments["captions"]), len(arguments["images"]), len(arguments["pairs"])
    text = sum(len(str(s).encode()) + 16 for part in ("captions", "images", "rejected_records") for s in arguments[part])
    items = n_captions * per_caption + n_images * per_image + n_pairs * per_pair + 1024 * (n_captions + n_images + n_pairs)
    return int(1.1 * (items + text)) + 10**6


def _refuse_a_full_disk(create: Callable[..., None]) -> Callable[..., None]:
    """:func:`create_run_file` with a full disk as one :class:`StoreError` at every step: the space the file needs
    is checked before HDF5 writes a byte (on a disk with a few KB free HDF5 fails with raw messages, or crashes),
    a full disk while creating gives the same message, and a failed creation leaves no file behind."""

    @functools.wraps(create)
    def create_checked(path: Path, **arguments: Any) -> None:
        target, needed = path.parent / RUN_FILE, _estimated_size(arguments)
        free = shutil.disk_usage(path.parent).free
        if needed > free:
            raise no_space(target, f"about {size_text(needed)}", free)
        is_ours = not path.exists()  # mode w- refuses an existing file: that one is not removed
        try:
            create(path, **arguments)
        except BaseException as e:
            is_full = not isinstance(e, StoreError) and is_disk_full(e, path.parent)
            if is_ours:
                path.unlink(missing_ok=True)
            if is_full:
                raise no_space(target, f"about {size_text(needed)}") from e
            raise

    return create_checked


@_refuse_a_full_disk
def create_run_file(
    path: Path,
    *,
    attributes: dict[str, Any],
    captions: Sequence[str],
    images: Sequence[str],
    pairs: Sequence[tuple[int, int]] | np.ndarray,
    rejected_records: Sequence[str],
    store_pair_maps: bool,
    precision: str,
    max_text_positions: int,
    n_image_positions: int,
    embedding_dim: int,
    grid: tuple[int, int],
    n_prefix: int,
) -> None:
    """Create ``run.h5`` with every dataset at full size (mode ``w-``: never truncates an existing file)."""
    n_captions, n_images, n_pairs = len(captions), len(images), len(pairs)
    # contributions and maps in float16 halve the file, where embeddings and every number stay float32; a
    # float64 run keeps everything in float64, so that a stored map is as exact as the API's
    array_dtype = {"float64": "f8", "float32": "f4", "float16": "f2"}[precision]
    number = "f8" if precision == "float64" else "f4"

    def _floats(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: str = number) -> None:
        _fixed(group, name, shape, dtype, np.nan)

    with h5py.File(path, "w-", locking=_HDF5_FILE_LOCKING) as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in attributes.items():
            # str() also turns str subclasses (torch's version string) into plain strings h5py can store
            f.attrs[key] = str(value) if isinstance(value, str) else value if isinstance(value, (int, float)) else json.dumps(value)
        text = f.create_group("captions")
        text.create_dataset("text", data=list(captions), dtype=_STRING)
        _fixed(text, "token_ids", (n_captions, max_text_positions), "i4", -1)
        _fixed(text, "tokens", (n_captions, max_text_positions), _TOKEN)
        _fixed(text, schema.OFFSETS, (n_captions, max_text_positions, 2), "i4")
        _fixed(text, schema.SPECIAL, (n_captions, max_text_positions), "?")
        _fixed(text, schema.UNKNOWN, (n_captions, max_text_positions), "?")
        _fixed(text, "n_positions", (n_captions,), "i4")
        _fixed(text, "is_truncated", (n_captions,), "?")
        image = f.create_group("images")
        image.attrs["grid"] = grid
        image.attrs["n_prefix"] = n_prefix
        image.create_dataset("path", data=list(images), dtype=_STRING)
        _fixed(image, "original_size", (n_images, 2), "i4")
        geometry = _fixed(image, schema.PREPROCESSING, (n_images, len(schema.PREPROCESSING_COLUMNS)), "f8", np.nan)
        geometry.attrs["columns"] = json.dumps(schema.PREPROCESSING_COLUMNS)
        _fixed(image, "notes", (n_images,), _NOTE)
        _fixed(image, schema.SHA256, (n_images,), "S64")
        _fixed(image, schema.FILE_SIZE, (n_images,), "i8")
        _fixed(image, schema.MTIME_NS, (n_images,), "i8")
        for group, n, n_positions in ((text, n_captions, max_text_positions), (image, n_images, n_image_positions)):
            _floats(group, "embedding", (n, embedding_dim))
            _floats(group, "reference_embedding", (n, embedding_dim))
            _floats(group, "completeness_error", (n,))
            _floats(group, "relative_completeness_error", (n,))
            _floats(group, "difference_norm", (n,))
            _fixed(group, "n_nodes", (n,), "i4")
            _fixed(group, schema.N_ENDPOINTS, (n,), "i4")
            _floats(group, schema.MAP_ERROR_BOUND, (n,))
            _fixed(group, "is_converged", (n,), "?")
            _floats(group, "contributions", (n, n_positions, embedding_dim), array_dtype)
            _fixed(group, schema.CHECKSUM, (n,), "u4")
            _status(group, n)
        pair = f.create_group("pairs")
        table = np.asarray(pairs, dtype=np.int64).reshape(n_pairs, 2)
        pair.create_dataset("caption_index", data=table[:, 0])
        pair.create_dataset("image_index", data=table[:, 1])
        _floats(pair, "score", (n_pairs,))
        _floats(pair, "terms", (n_pairs, 4))
        _floats(pair, "four_term_value", (n_pairs,))
        _floats(pair, "completeness_error", (n_pairs,))
        _floats(pair, "relative_completeness_error", (n_pairs,))
        _floats(pair, "completeness_bound", (n_pairs,))
        _floats(pair, schema.MAP_ERROR_BOUND, (n_pairs,))
        if store_pair_maps:  # otherwise readers compute a pair's map from its two stored contribution arrays
            _floats(pair, "interactions", (n_pairs, max_text_positions, n_image_positions), array_dtype)
        _fixed(pair, schema.CHECKSUM, (n_pairs,), "u4")
        _status(pair, n_pairs, _PAIR_ERROR)
        f.create_dataset("rejected_records", data=list(rejected_records), dtype=_STRING, shape=(len(rejected_records),))
    _reserve(path)


def _reserve(path: Path) -> None:
    """Reserve the file's disk space now, so that a full disk is found before any work is done, with the space
    it needs, and never in the middle of a write."""
    size = path.stat().st_size
    needed = max(0, size - path.stat().st_blocks * 512)  # what the file does not occupy yet
    free = shutil.disk_usage(path.parent).free
    if needed > free:  # create_run_file removes the file it made when this fails
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


def _open_for_reading(path: Path) -> h5py.File:
    """Open an HDF5 file for reading with HDF5's default file locking, as a user's own ``h5py.File(path)`` does:
    HDF5 refuses to open one file twice in a process with different locking flags, so a reader that differed
    would break a notebook that also reads the run with plain h5py (or serves the viewer). Where the lock fails
    (ENOLCK), or the file is already open here without locking (a writer of this process), it opens without.
    Writers (xclip.disk.locking) take no HDF5 lock, so a reader's shared lock never blocks them."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", locking=False)


def _open_run_file(path: Path, mode: str = "r") -> h5py.File:
    """Open ``run.h5``; a clear :class:`StoreError` for missing or damaged files."""
    if not path.is_file():
        msg = f"no run file at {path}"
        raise RunUnavailable(msg)
    try:
        if mode == "r":
            f = _open_for_reading(path)
        elif os.environ.get(_KILL_AT_WRITE):
            f = h5py.File(_KillingFile(path, int(os.environ[_KILL_AT_WRITE])), mode, locking=_HDF5_FILE_LOCKING)
        else:
            f = h5py.File(path, mode, locking=_HDF5_FILE_LOCKING)
    except OSError as e:
        msg = f"cannot open {path} ({e}): it is not a run file, or it was damaged outside xclip (a full disk while it was being created, a failing disk): attribute it again with overwrite=True"
        raise StoreError(msg, setting="overwrite") from e
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        msg = f"{path} has schema version {version}, this xclip reads {SCHEMA_VERSION}: attribute it again with this version and overwrite=True"
        raise StoreError(msg, setting="overwrite")
    return f


class _KillingFile(io.FileIO):
    """The crash tests' fault injection: a file whose N-th write writes half its bytes, then kills the process
    with SIGKILL, as a power cut or the OOM killer would, in the middle of a write."""

    def __init__(self, path: Path, kill_at: int) -> None:
        super().__init__(path, "r+")
        self.countdown = kill_at

    def write(self, data: Any) -> int:
        self.countdown -= 1
        if self.countdown == 0:
            view = memoryview(data).cast("B")
            super().write(view[: len(view) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write(data)


def _commit(f: h5py.File, group: h5py.Group, indices: Sequence[int]) -> None:
    """Mark items done whose data were written: first the data reach the disk (flush, fsync), then the status
    does, so that a status never says done about data a kill lost."""
    if not len(indices):
        return
    _sync(f)
    order = np.sort(np.asarray(indices, dtype=np.int64))
    group["error"][order] = np.zeros(len(order), dtype=group["error"].dtype)
    group["status"][order] = np.full(len(order), DONE, dtype="i1")
    f.flush()


def _sync(f: h5py.File) -> None:
    f.flush()  # HDF5's buffers to the operating system
    if f.driver == "sec2":
        os.fsync(f.id.get_vfd_handle())  # and the operating system's to the disk


@contextmanager
def _damaged_file_errors(path: Path) -> Iterator[None]:
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


def _mark_failed(group: h5py.Group, index: int, reason: str) -> None:
    group["error"][index] = _utf8(reason, group["error"].dtype.itemsize)
    group["status"][index] = FAILED


def _write_contributions(group: h5py.Group, index: int, item: Contributions) -> None:
    """One caption's or image's results, with the checksum of its stored arrays; :func:`_commit` marks it done."""
    n = item.values.shape[0]
    values = np.full(group["contributions"].shape[1:], np.nan, dtype=group["contributions"].dtype)
    values[:n] = item.values.double().cpu().numpy()
    embedding = item.embedding.double().cpu().numpy().astype(group["embedding"].dtype)
    reference = item.reference_embedding.double().cpu().numpy().astype(group["reference_embedding"].dtype)
    group["contributions"][index] = values
    group["embedding"][index] = embedding
    group["reference_embedding"][index] = reference
    group[schema.CHECKSUM][index] = _checksum(values, embedding, reference)
    group["completeness_error"][index] = item.completeness_error
    group["relative_completeness_error"][index] = item.relative_completeness_error
    group["difference_norm"][index] = item.difference_norm
    group["n_nodes"][index] = item.n_nodes
    group[schema.N_ENDPOINTS][index] = item.n_endpoints
    group[schema.MAP_ERROR_BOUND][index] = item.map_error_bound
    group["is_converged"][index] = item.is_converged


def _write_caption_tokens(group: h5py.Group, index: int, token_ids: Sequence[int], item: Contributions) -> None:
    n = len(item.labels)
    ids = np.full(group["token_ids"].shape[1], -1, dtype="i4")
    ids[:n] = token_ids[:n]
    group["token_ids"][index] = ids
    tokens = [_utf8(token, _TOKEN.itemsize) for token in item.labels] + [b""] * (group["tokens"].shape[1] - n)
    group["tokens"][index] = np.array(tokens, dtype=_TOKEN)
    group["n_positions"][index] = n
    group["is_truncated"][index] = item.is_truncated
    caption = item.caption_tokens
    assert caption is not None, "the engine gives every caption its tokens"
    width = group[schema.OFFSETS].shape[1]
    offsets = np.zeros((width, 2), dtype="i4")
    offsets[:n] = np.asarray(caption.offsets, dtype="i4").reshape(n, 2)
    group[schema.OFFSETS][index] = offsets
    for name, flags in ((schema.SPECIAL, caption.special), (schema.UNKNOWN, caption.unknown)):
        row = np.zeros(width, dtype=bool)
        row[:n] = flags
        group[name][index] = row


class ImageSource(NamedTuple):
    """What a run stores of an image beside its results."""

    notes: Sequence[str]  # what was done to read it (EXIF orientation applied, ...)
    file: FileIdentity  # the file it was read from


def _write_image_source(group: h5py.Group, index: int, source: ImageSource, item: Contributions) -> None:
    """An image's size as read (after EXIF orientation), where its patches lie, what was done to read it, and
    the file it was read from."""
    assert item.geometry is not None, "the engine gives every image its geometry"
    notes, file = source
    group[schema.SHA256][index] = file.sha256.encode()
    group[schema.FILE_SIZE][index] = file.size
    group[schema.MTIME_NS][index] = file.mtime_ns
    group["original_size"][index] = item.geometry.original_size
    group[schema.PREPROCESSING][index] = item.geometry.to_row()
    group["notes"][index] = _utf8("; ".join(notes), _NOTE.itemsize)


def _read_contributions(group: h5py.Group, index: int, *, labels: list[str], grid: tuple[int, int] | None,
                       n_prefix: int, n_positions: int, caption_tokens: CaptionTokens | None = None,
                       geometry: Preprocessing | None = None) -> Contributions:
    """One stored caption's or image's contributions, as the engine returned them (in float32, or float64 in a
    float64 run)."""
    import torch

    values, embedding = group["contributions"][index], group["embedding"][index]
    reference = group["reference_embedding"][index]
    _verify(group, index, _checksum(values, embedding, reference))
    return Contributions(
        modality="image" if grid is not None else "text",
        values=torch.from_numpy(values[:n_positions].astype(_read_dtype(group["contributions"]))),
        embedding=torch.from_numpy(embedding),
        reference_embedding=torch.from_numpy(reference),
        labels=labels,
        grid=grid,
        n_prefix=n_prefix,
        completeness_error=float(group["completeness_error"][index]),
        difference_norm=float(group["difference_norm"][index]),
        n_nodes=int(group["n_nodes"][index]),
        n_endpoints=int(group[schema.N_ENDPOINTS][index]),
        map_error_bound=float(group[schema.MAP_ERROR_BOUND][index]),
        is_converged=bool(group["is_converged"][index]),
        caption_tokens=caption_tokens,
        geometry=geometry,
    )


def _write_pairs(group: h5py.Group, indices: Sequence[int], items: Sequence[PairNumbers]) -> None:
    """Pairs' results, one write per dataset for the whole batch (``indices`` increasing); :func:`_commit` marks
    them done."""
    order = np.asarray(indices, dtype=np.int64)
    if not len(order):
        return
    is_contiguous = order[-1] - order[0] + 1 == len(order)
    rows: slice | np.ndarray = slice(int(order[0]), int(order[-1]) + 1) if is_contiguous else order
    maps: list[np.ndarray] = []
    if "interactions" in group:
        values = np.full((len(items), *group["interactions"].shape[1:]), np.nan, dtype=group["interactions"].dtype)
        for k, item in enumerate(items):
            n_rows, n_columns = item.interactions.shape
            values[k, :n_rows, :n_columns] = item.interactions.double().cpu().numpy()  # type: ignore[attr-defined]  (maps are stored only as maps)
        group["interactions"][rows] = values
        maps = list(values)
    terms = np.stack([item.terms.double().cpu().numpy() for item in items]).astype(group["terms"].dtype)
    group["terms"][rows] = terms
    numbers = [np.array([getattr(item, name) for item in items], dtype=group[name].dtype) for name in schema.PAIR_NUMBERS]
    for name, column in zip(schema.PAIR_NUMBERS, numbers):
        group[name][rows] = column
    group[schema.CHECKSUM][rows] = np.array(
        [_checksum(*maps[k : k + 1], terms[k], *(column[k] for column in numbers)) for k in range(len(items))], dtype="u4"
    )


def _pair_numbers_row(group: h5py.Group, pair: int) -> list[np.ndarray]:
    """A pair's terms and numbers as stored, in the order its checksum covers them."""
    return [group["terms"][pair], *(group[name][pair] for name in schema.PAIR_NUMBERS)]


def _checksum(*arrays: np.ndarray) -> int:
    """CRC-32 of arrays' bytes as stored, one after the other."""
    crc = 0
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).tobytes(), crc)
    return crc


def _verify(group: h5py.Group, index: int, checksum: int) -> None:
    """Refuse an item whose stored results no longer match the checksum written with them."""
    if int(group[schema.CHECKSUM][index]) != checksum:
        msg = (
            f"{group.file.filename}: {group.name.strip('/')} {index} is damaged (its stored results do not match "
            "their checksum: zeroed or altered bytes, a failing disk or an incomplete copy); attribute the run "
            "again with overwrite=True"
        )
        raise StoreError(msg, setting="overwrite")


def _read_dtype(dataset: h5py.Dataset) -> type:
    """Stored arrays are read as float32, float64 ones as float64 (float16 storage only saves space)."""
    return np.float64 if dataset.dtype == np.float64 else np.float32


def run_file_path(run_dir: str | Path) -> Path:
    """The run file of a run directory; a path ending in ``.h5`` is taken as the file itself."""
    path = Path(run_dir)
    return path if path.suffix == ".h5" else path / RUN_FILE


class RunReader:
    """Read access to a run file, for inspect, render and evaluate: what the file holds, by item.

    It never takes the writer lock, so it works on a run that is still being written (it shows what is
    finished). Every h5py error while reading becomes a :class:`StoreError` naming the file. A pair's map is
    read when the run stored maps (``output.pair_maps``), and computed from the two stored contribution arrays
    otherwise, through :func:`xclip.interaction_map`: readers see the same map either way.
    """

    _mode = "r"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = run_file_path(run_dir)
        self._file = _open_run_file(self.path, self._mode)
        with self._reading():
            self.attrs: dict[str, Any] = dict(self._file.attrs)
            self.config: dict[str, Any] = json.loads(self.attrs["config"])
            self.grid: tuple[int, int] = tuple(int(v) for v in self._file["images"].attrs["grid"])  # type: ignore[assignment]
            self.n_prefix = int(self._file["images"].attrs["n_prefix"])
            self.has_pair_maps = "interactions" in self._file["pairs"]
        self._fixed: dict[str, Any] = {}  # what a run never changes after creating the file, read once

    def __enter__(self):  # noqa: ANN204  (the subclass's own type; typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with _damaged_file_errors(self.path):
            yield

    def status(self, group: str) -> np.ndarray:
        """Status per item of ``captions``, ``images`` or ``pairs``: PENDING, DONE or FAILED."""
        with self._reading():
            return self._file[group]["status"][:]

    def errors(self, group: str, indices: Sequence[int]) -> list[str]:
        """Why the given items failed, in the order of ``indices``."""
        if not len(indices):
            return []
        return [str(error) for error in self.values(group, "error", indices, text=True)]

    def value(self, group: str, name: str, index: int) -> Any:
        """One item's entry of a per-item dataset (one read, where :meth:`column` reads them all)."""
        with self._reading():
            return self._file[group][name][index]

    def values(self, group: str, name: str, indices: Sequence[int] | np.ndarray, *, text: bool = False) -> np.ndarray:
        """The entries of the given items of a per-item dataset, in the order of ``indices`` (repeats
        allowed): one read of the distinct items, where :meth:`value` reads one item and :meth:`column` all.
        ``text`` decodes a string dataset to ``str`` (an object array); otherwise entries are as stored."""
        # h5py reads increasing, distinct indices: read those, then give them back in the caller's order
        distinct, order = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        with self._reading():
            dataset = self._file[group][name]
            read = (dataset.asstr() if text else dataset)[distinct]
        return read[order.reshape(-1)]

    def finished_columns(self, group: str, names: Sequence[str], status: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Whole per-item number columns (``names``) as float64, NaN wherever the item is not done.

        The file holds zeros for unfinished items (their storage is never filled), which would otherwise
        sort, filter and show as values. ``status``: the group's status as the caller already read it, so
        that the columns agree with it; read here (once, before the columns: an item's data are committed
        before its status) when not given."""
        if status is None:
            status = self.status(group)
        unfinished = status != DONE
        columns = {}
        for name in names:
            values = self.column(group, name).astype(np.float64)
            values[unfinished] = np.nan
            columns[name] = values
        return columns

    def column(self, group: str, name: str) -> np.ndarray:
        """One per-item dataset of the README's table, whole (scores, errors, node counts, sizes, ...)."""
        if (group, name) in (("pairs", "caption_index"), ("pairs", "image_index")):
            return self._once(f"{group}/{name}", lambda: self._file[group][name][:])
        with self._reading():
            return self._file[group][name][:]

    def captions(self) -> list[str]:
        return self._once("captions/text", lambda: list(self._file["captions/text"].asstr()[:]))

    def image_paths(self) -> list[str]:
        """Image paths relative to the data root."""
        return self._once("images/path", lambda: list(self._file["images/path"].asstr()[:]))

    def _once(self, key: str, read: Any) -> Any:
        if key not in self._fixed:
            with self._reading():
                self._fixed[key] = read()
        return self._fixed[key]

    def rejected_records(self) -> list[str]:
        with self._reading():
            return list(self._file["rejected_records"].asstr()[:])

    def bytes_per_item(self, group: str) -> int:
        """Bytes one item of ``captions``, ``images`` or ``pairs`` takes in the file: its rows of every
        fixed-size dataset (variable-length text, the captions and image paths, is not counted)."""
        with self._reading():
            items = self._file[group]
            n = len(items["status"])
            rows = [d for d in items.values() if d.dtype.kind != "O" and d.shape[:1] == (n,)]
            return sum(d.nbytes for d in rows) // n if n else 0

    @property
    def panel_layout(self) -> dict[str, Any]:
        """The first panels the run's adaptive rule used: ``{"text": [...], "image": [...], "source": ...}``."""
        return json.loads(self.attrs["panel_layout"])

    @property
    def settings(self) -> RunConfig:
        """The run's settings as the typed config they were given as (read once)."""
        from xclip.config import RunConfig

        return self._once("settings", lambda: RunConfig.model_validate_json(self.attrs["config"]))

    def n_items(self, group: str) -> int:
        """How many captions, images or pairs the run has (no data read)."""
        with self._reading():
            return len(self._file[group][schema.STATUS])

    def caption(self, caption: int) -> str:
        """One caption's text (one row read, where :meth:`captions` reads them all)."""
        with self._reading():
            return str(self._file["captions/text"].asstr()[caption])

    def image_path(self, image: int) -> str:
        """One image's path relative to the data root (one row read)."""
        with self._reading():
            return str(self._file["images/path"].asstr()[image])

    def pair_inputs(self, pair: int) -> tuple[int, int]:
        """A pair's (caption index, image index), read from its own row."""
        with self._reading():
            pairs = self._file["pairs"]
            return int(pairs[schema.CAPTION_INDEX][pair]), int(pairs[schema.IMAGE_INDEX][pair])

    def caption_tokens(self, caption: int) -> CaptionTokens:
        """A finished caption's positions as its own text: token strings, character spans, flags."""
        with self._reading():
            group = self._file["captions"]
            n = int(group["n_positions"][caption])
            return CaptionTokens(
                caption=self.caption(caption),
                tokens=list(group["tokens"].asstr()[caption, :n]),
                offsets=[(int(a), int(b)) for a, b in group[schema.OFFSETS][caption, :n]],
                special=[bool(v) for v in group[schema.SPECIAL][caption, :n]],
                unknown=[bool(v) for v in group[schema.UNKNOWN][caption, :n]],
            )

    def image_file(self, image: int) -> FileIdentity:
        """The file a finished image was read from: its size, modification time and content digest."""
        with self._reading():
            group = self._file["images"]
            return FileIdentity(int(group[schema.FILE_SIZE][image]), int(group[schema.MTIME_NS][image]),
                                group[schema.SHA256][image].decode())

    def preprocessing(self, image: int) -> Preprocessing:
        """Where a finished image's patches lie in the original image."""
        with self._reading():
            return Preprocessing.from_row(self._file["images"][schema.PREPROCESSING][image])

    def contributions(self, group: str, index: int) -> Contributions:
        """A finished caption's (``captions``) or image's (``images``) contributions, as the engine gave them."""
        with self._reading():
            items = self._file[group]
            if group == "captions":
                tokens = self.caption_tokens(index)
                return _read_contributions(items, index, labels=tokens.tokens, grid=None, n_prefix=0,
                                           n_positions=len(tokens), caption_tokens=tokens)
            rows, cols = self.grid
            labels = ["cls"] * self.n_prefix + [f"patch({r},{c})" for r in range(rows) for c in range(cols)]
            return _read_contributions(items, index, labels=labels, grid=self.grid, n_prefix=self.n_prefix,
                                       n_positions=len(labels), geometry=self.preprocessing(index))

    def interactions(self, pair: int) -> np.ndarray:
        """A finished pair's token x image-position map, ``(n_tokens, S)`` (CLS columns first)."""
        caption, image = self.pair_inputs(pair)
        if self.has_pair_maps:
            with self._reading():
                n = int(self._file["captions/n_positions"][caption])
                pairs = self._file["pairs"]
                row = pairs["interactions"][pair]
                _verify(pairs, pair, _checksum(row, *_pair_numbers_row(pairs, pair)))
                return row[:n].astype(_read_dtype(pairs["interactions"]))
        from xclip.core.interaction import interactions

        scale = float(self.attrs["logit_scale"]) if self.settings.attribution.scale_by_logit else 1.0
        rows, columns = self.contributions("captions", caption).values, self.contributions("images", image).values
        # as a batch of one pair, the product xclip.interaction_maps takes: the same kernel, the same rounding
        return (interactions(rows[None], columns[None])[0] * scale).numpy()

    def image_source(self, image: int, data_root: Path | None = None, *, owner: str = "") -> Path:
        """A finished image's file under the data root (see :meth:`data_root`), checked: there, and unchanged
        since it was attributed; ``owner`` says whose image it is in the messages (``" of pair 3"``).

        Raises:
            MissingImage: no file there (the data moved: name the images' new folder).
            ConfigError: the file changed since it was attributed, so the stored map is of another picture (found
                as the run's ``data.verify``, the one it was created with, says).
        """
        stored = self.image_path(image)
        path = self.data_root(data_root) / stored
        if not path.is_file():
            msg = f"image {path}{owner} is not there: was the data moved? give the images' new folder"
            raise MissingImage(msg, setting="data_root")
        if has_changed(path, self.image_file(image), verify=self.settings.data.verify):
            msg = (f"image {stored}{owner} changed since it was attributed (its content differs from the digest in the "
                   "run file): its map is of the old picture; resume the run to attribute it again")
            raise ConfigError(msg)
        return path

    def data_root(self, override: Path | None = None) -> Path:
        """The images' folder: ``override``, the run's ``data.root``, or, when that is gone, the same folder
        relative to the run (a project moved as a whole)."""
        if override is not None:
            return override
        configured = self.settings.data.root
        moved = (self.path.parent / str(self.attrs.get("data_root_from_run", ""))).resolve()
        return moved if not configured.is_dir() and moved.is_dir() else configured


class MissingImage(ConfigError):
    """A finished image's file is not where the run read it: the data moved (see :meth:`RunReader.image_source`)."""


class RunWriter(RunReader):
    """Write access for the one process that holds the directory's :func:`writer_lock`: items' results, their
    failures, and per-batch commits (see the module's crash-safety notes)."""

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
        pairs = np.flatnonzero(np.isin(self.column(schema.PAIRS, schema.IMAGE_INDEX), np.asarray(images)))
        for group, indices in ((schema.PAIRS, pairs), (schema.IMAGES, np.sort(np.asarray(images)))):
            if len(indices):
                self._file[group][schema.STATUS][indices] = np.full(len(indices), PENDING, dtype="i1")
            _sync(self._file)

    def fail(self, group: str, index: int, reason: str) -> None:
        _mark_failed(self._file[group], int(index), reason)

    def write_captions(self, indices: Sequence[int], token_ids: Sequence[Sequence[int]], items: Sequence[Contributions]) -> None:
        group = self._file["captions"]
        for index, ids, item in zip(indices, token_ids, items):
            _write_caption_tokens(group, int(index), ids, item)
            _write_contributions(group, int(index), item)

    def write_images(self, indices: Sequence[int], sources: Sequence[ImageSource], items: Sequence[Contributions]) -> None:
        group = self._file["images"]
        for index, source, item in zip(indices, sources, items):
            _write_image_source(group, int(index), source, item)
            _write_contributions(group, int(index), item)

    def write_pairs(self, indices: Sequence[int], items: Sequence[PairNumbers]) -> None:
        _write_pairs(self._file["pairs"], indices, items)

    def commit(self, group: str, indices: Sequence[int]) -> None:
        _commit(self._file, self._file[group], indices)


def merge_shards(directory: Path, *, allow_partial: bool = False, overwrite: bool = False, block: int = 1024,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Concatenate ``directory/shard-*-of-N/run.h5`` into ``directory/run.h5`` (written to a temporary file,
    then renamed). Pair indices are shifted onto the merged caption and image rows. ``progress`` is called with
    the shards copied and their number.

    Refused with a :class:`StoreError`: shards of different splits, a missing shard, shards made with different
    settings or weights (the differing keys are named), and shards with unfinished pairs unless
    ``allow_partial`` (their pairs then stay pending in the merged file, which records ``is_partial``). A
    ``directory/run.h5`` that is not an earlier merge of the same shards is refused with a :class:`ConfigError`
    unless ``overwrite`` (see :func:`_check_merge_target`).
    """
    shards = sorted(directory.glob("shard-*-of-*/run.h5"))
    if not shards:
        msg = f"no shard-*-of-*/run.h5 under {directory}"
        raise StoreError(msg)
    splits = sorted({path.parent.name.rsplit("-of-", 1)[1] for path in shards})
    if len(splits) > 1:
        msg = f"{directory} holds shards of different splits (-of-{', -of-'.join(splits)}); remove the ones of old runs"
        raise StoreError(msg)
    expected = int(splits[0])
    present = {int(path.parent.name.split("-")[1]) for path in shards}
    missing = sorted(set(range(expected)) - present)
    if missing or len(shards) != expected:
        msg = f"{directory} has {len(shards)} of {expected} shards; run the missing ones first (shard index {', '.join(map(str, missing[:10]))})"
        raise StoreError(msg)
    with writer_lock(directory, "xclip merge"):
        _check_shards(shards, allow_partial)
        if not overwrite:
            _check_merge_target(directory / RUN_FILE, shards)
        return _merge(directory, shards, allow_partial, block, progress)


def _check_merge_target(target: Path, shards: list[Path]) -> None:
    """Refuse to replace ``target`` unless it is absent or an earlier merge of these shards: merged from the same
    shard files, with their settings, weights and data, and as many pairs as they hold together."""
    if not target.exists():
        return
    names = [str(path.relative_to(target.parent)) for path in shards]
    n_pairs = sum(_pair_count(path) for path in shards)
    try:
        with _open_for_reading(target) as held, _open_run_file(shards[0]) as first:
            merged_from = json.loads(held.attrs["merged_from"]) if "merged_from" in held.attrs else None
            if merged_from == names and len(held["pairs/status"]) == n_pairs and all(
                held.attrs.get(key) == first.attrs.get(key) for key in ("fingerprint", "model_weights_sha256", "data_sha256")
            ):
                return
            model = json.loads(held.attrs["config"])["model"]["name"] if "config" in held.attrs else "?"
            n_done = int((held["pairs/status"][:] == DONE).sum()) if "pairs/status" in held else 0
            origin = "a merge of other shards or settings" if merged_from is not None else "not a merge of these shards"
            held_text = f"a run of {n_done} finished pairs of model {model} ({origin})"
    except (OSError, KeyError, ValueError) as e:
        held_text = f"a file xclip cannot read as a run ({e})"
    msg = f"{target} holds {held_text}; merging would replace it. Merge into another directory, or pass overwrite=True to replace it"
    raise ConfigError(msg, setting="overwrite")


def _pair_count(path: Path) -> int:
    with _open_run_file(path) as f:
        return len(f["pairs/status"])


def _check_shards(shards: list[Path], allow_partial: bool) -> None:
    """Shards must share every setting that changes results, and be finished (unless ``allow_partial``)."""
    from xclip.config import settings_differences

    unfinished = []
    first: dict[str, Any] = {}
    for path in shards:
        with _open_run_file(path) as f:
            fingerprint = json.loads(f.attrs["fingerprint"])
            fingerprint["runtime"].pop("shard_index", None)  # the one setting shards differ in
            identity = {
                "fingerprint": json.dumps(fingerprint, sort_keys=True),
                "weights": f.attrs.get("model_weights_sha256", ""),
                "data": f.attrs["data_sha256"],
                "maps": "interactions" in f["pairs"],
            }
            if not first:
                first = {"path": path, **identity}
            elif identity["fingerprint"] != first["fingerprint"]:
                differences = "; ".join(settings_differences(first["fingerprint"], identity["fingerprint"]))
                msg = f"{path} was made with other settings than {first['path']} ({differences}): shards of one run share every setting"
                raise StoreError(msg)
            elif identity["weights"] != first["weights"]:
                msg = f"{path} was made with other model weights than {first['path']} (weights sha256 differ)"
                raise StoreError(msg)
            elif identity["maps"] != first["maps"]:
                msg = f"{path} {'stores' if identity['maps'] else 'does not store'} pair maps, {first['path']} does the opposite: shards of one run share output.pair_maps"
                raise StoreError(msg)
            elif identity["data"] != first["data"]:
                msg = f"{path} was made from other data files than {first['path']} (data sha256 differ: the files changed between the shards' runs)"
                raise StoreError(msg)
            n_pending = int((f["pairs/status"][:] == PENDING).sum())
            if n_pending:
                unfinished.append(f"{path.parent.name}: {n_pending} of {len(f['pairs/status'])} pairs")
    if unfinished and not allow_partial:
        msg = "unfinished shards (rerun their shard of the run to finish them, or merge with allow_partial=True to keep those pairs pending): " + "; ".join(unfinished)
        raise StoreError(msg, setting="allow_partial")


def _merge(directory: Path, shards: list[Path], allow_partial: bool, block: int,
           progress: Callable[[int, int], None] | None) -> Path:
    target = directory / "run.h5"
    temporary = target.with_suffix(".h5.tmp")
    temporary.unlink(missing_ok=True)
    # the merged file holds what the shards hold: their files' sizes, and a margin for HDF5's own metadata
    needed = int(1.1 * sum(path.stat().st_size for path in shards)) + 10**6
    advice = "free space, then merge again"
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise no_space(target, f"about {size_text(needed)}", free, advice=advice)
    sources = [_open_run_file(path) for path in shards]
    try:
        with h5py.File(temporary, "w-", locking=_HDF5_FILE_LOCKING) as merged:
            for key, value in sources[0].attrs.items():
                merged.attrs[key] = value
            merged.attrs["merged_from"] = json.dumps([str(p.relative_to(directory)) for p in shards])
            merged.attrs["is_partial"] = bool(sum(int((src["pairs/status"][:] == PENDING).sum()) for src in sources))
            # every shard reads the whole data files, so each holds the same rejected records
            merged.create_dataset("rejected_records", data=sources[0]["rejected_records"][:], dtype=_STRING)
            for group_name in ("captions", "images", "pairs"):
                first = sources[0][group_name]
                group = merged.create_group(group_name)
                for key, value in first.attrs.items():
                    group.attrs[key] = value
                totals = [len(src[group_name]["status"]) for src in sources]
                for name, dataset in first.items():
                    shape = (sum(totals), *dataset.shape[1:])
                    string = h5py.check_string_dtype(dataset.dtype)
                    if string is not None and string.length is None:  # text of the file's creation
                        group.create_dataset(name, shape=shape, dtype=dataset.dtype)
                    else:
                        _fixed(group, name, shape, dataset.dtype, dataset.fillvalue)  # float16 arrays stay float16
            offsets = {"captions": 0, "images": 0, "pairs": 0}
            for src in sources:
                for group_name in ("captions", "images", "pairs"):
                    n = len(src[group_name]["status"])
                    start = offsets[group_name]
                    for name, dataset in src[group_name].items():
                        shift = {"caption_index": offsets["captions"], "image_index": offsets["images"]}.get(name, 0)
                        for row in range(0, n, block):
                            rows = dataset[row : row + block]
                            merged[group_name][name][start + row : start + row + len(rows)] = rows + shift if shift else rows
                for group_name in offsets:
                    offsets[group_name] += len(src[group_name]["status"])
                if progress is not None:
                    progress(sources.index(src) + 1, len(sources))
        install_file(temporary, target)
    except BaseException as e:
        is_full = is_disk_full(e, directory)
        temporary.unlink(missing_ok=True)
        if is_full:
            raise no_space(target, f"about {size_text(needed)}", advice=advice) from e
        raise
    finally:
        for src in sources:
            src.close()
    return target


class BackgroundWrites:
    """Stores a stage's batches from one background thread while the main thread computes the next batch, so
    that writing and fsyncing leave the critical path. One thread with one batch in flight keeps the store's
    order (a batch's data reach the disk before its status) and bounds the results held in memory to two
    batches. A failed write surfaces in the main thread at the next batch, or when the stage ends; the stage
    always waits for the batch in flight, so an interrupted run keeps every batch it computed."""

    def __init__(self, run: RunWriter, group: str) -> None:
        self.run, self.group = run, group
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"xclip-{group}-writes")
        self._in_flight: Future[None] | None = None

    def submit(self, failed: Sequence[tuple[int, str]], written: Sequence[int], write: Callable[[], None]) -> None:
        """Mark ``failed`` items failed, ``write()`` the results of ``written``, then commit them. ``write``
        binds its arguments now (a ``functools.partial``; a lambda would see the next batch's lists)."""
        self.wait()
        self._in_flight = self._thread.submit(self._store, failed, written, write)

    def _store(self, failed: Sequence[tuple[int, str]], written: Sequence[int], write: Callable[[], None]) -> None:
        for index, reason in failed:
            self.run.fail(self.group, index, reason)
        write()
        self.run.commit(self.group, written)

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
