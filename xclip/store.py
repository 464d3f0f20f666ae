"""The HDF5 file of a run directory: flat, item-indexed datasets that plain h5py users can read.

Every dataset is created at full size when the run starts; a ``status`` column per group (0 pending, 1 done,
2 failed, with the reason in ``error``) is written after each item's data and flushed after every batch, so a
killed run keeps every finished item and a rerun completes the rest. See the README for the table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xclip.errors import StoreError
from xclip.result import Contributions, InteractionMap

SCHEMA_VERSION = 3
LOCK_FILE = ".writer.lock"
_UNREADABLE_LOCK_GRACE_SECONDS = 30  # a lock file is written right after it is created
PENDING, DONE, FAILED = 0, 1, 2
_STRING = h5py.string_dtype()


def _floats(group: h5py.Group, name: str, shape: tuple[int, ...], per_item: bool = False) -> None:
    """A float32 dataset, chunked by item and gzip-compressed when it holds one array per item."""
    if per_item:
        group.create_dataset(
            name, shape=shape, dtype="f4", chunks=(1, *shape[1:]), compression="gzip", shuffle=True, fillvalue=np.nan
        )
    else:
        group.create_dataset(name, shape=shape, dtype="f4", fillvalue=np.nan)


def _status(group: h5py.Group, n: int) -> None:
    group.create_dataset("status", shape=(n,), dtype="i1", fillvalue=PENDING)
    group.create_dataset("error", shape=(n,), dtype=_STRING)


def create_run_file(
    path: Path,
    *,
    attributes: dict[str, Any],
    captions: Sequence[str],
    images: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    rejected_records: Sequence[str],
    max_text_positions: int,
    n_image_positions: int,
    embedding_dim: int,
    grid: tuple[int, int],
    n_prefix: int,
) -> None:
    """Create ``run.h5`` with every dataset at full size (mode ``w-``: never truncates an existing file)."""
    n_captions, n_images, n_pairs = len(captions), len(images), len(pairs)
    with h5py.File(path, "w-") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in attributes.items():
            # str() also turns str subclasses (torch's version string) into plain strings h5py can store
            f.attrs[key] = str(value) if isinstance(value, str) else value if isinstance(value, (int, float)) else json.dumps(value)
        text = f.create_group("captions")
        text.create_dataset("text", data=list(captions), dtype=_STRING)
        text.create_dataset("token_ids", shape=(n_captions, max_text_positions), dtype="i4", fillvalue=-1)
        text.create_dataset("tokens", shape=(n_captions, max_text_positions), dtype=_STRING)
        text.create_dataset("n_positions", shape=(n_captions,), dtype="i4")
        text.create_dataset("is_truncated", shape=(n_captions,), dtype="?")
        image = f.create_group("images")
        image.attrs["grid"] = grid
        image.attrs["n_prefix"] = n_prefix
        image.create_dataset("path", data=list(images), dtype=_STRING)
        image.create_dataset("original_size", shape=(n_images, 2), dtype="i4")
        image.create_dataset("notes", shape=(n_images,), dtype=_STRING)
        for group, n, n_positions in ((text, n_captions, max_text_positions), (image, n_images, n_image_positions)):
            _floats(group, "embedding", (n, embedding_dim))
            _floats(group, "reference_embedding", (n, embedding_dim))
            _floats(group, "completeness_error", (n,))
            _floats(group, "relative_completeness_error", (n,))
            _floats(group, "difference_norm", (n,))
            group.create_dataset("n_nodes", shape=(n,), dtype="i4")
            group.create_dataset("is_converged", shape=(n,), dtype="?")
            _floats(group, "contributions", (n, n_positions, embedding_dim), per_item=True)
            _status(group, n)
        pair = f.create_group("pairs")
        pair.create_dataset("caption_index", data=np.array([p[0] for p in pairs], dtype="i8").reshape(n_pairs))
        pair.create_dataset("image_index", data=np.array([p[1] for p in pairs], dtype="i8").reshape(n_pairs))
        _floats(pair, "score", (n_pairs,))
        _floats(pair, "terms", (n_pairs, 4))
        _floats(pair, "four_term_value", (n_pairs,))
        _floats(pair, "completeness_error", (n_pairs,))
        _floats(pair, "relative_completeness_error", (n_pairs,))
        _floats(pair, "completeness_bound", (n_pairs,))
        _floats(pair, "interactions", (n_pairs, max_text_positions, n_image_positions), per_item=True)
        _status(pair, n_pairs)
        f.create_dataset("rejected_records", data=list(rejected_records), dtype=_STRING, shape=(len(rejected_records),))


@contextmanager
def writer_lock(directory: Path, command: str = "") -> Iterator[None]:
    """Hold the run directory's writer lock: one ``xclip attribute`` per directory at a time.

    The lock is a file created with ``O_EXCL`` (atomic, also on NFS) that names its holder: PID, host, start time
    and command. A lock left by a process that is gone (same host, PID not running) is taken over; a lock of a
    live process, or of another host (whose processes cannot be checked), is refused with the holder named.
    Readers (inspect, render, evaluate) never take it. A directory the lock created is removed again if the run
    left nothing in it (a config error after the lock was taken writes nothing).
    """
    is_new = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            current = _lock_holder(path)
            if current is not None:
                msg = (
                    f"{directory} is being written by process {current.get('pid')} on {current.get('host')} since "
                    f"{current.get('started')} ({current.get('command') or 'xclip attribute'}): wait for it to finish or "
                    f"stop it (its finished items are kept). If that process is gone, delete {path}"
                )
                raise StoreError(msg) from None
            path.unlink(missing_ok=True)  # its writer is gone: take it over
            continue
        with os.fdopen(descriptor, "w") as stream:
            json.dump(holder, stream)
            stream.flush()
            os.fsync(stream.fileno())
        break
    else:
        msg = f"cannot take the writer lock {path}: other processes keep taking it"
        raise StoreError(msg)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if is_new and not any(directory.iterdir()):
            directory.rmdir()


def _lock_holder(path: Path) -> dict[str, Any] | None:
    """The live holder recorded in a lock file, or None when the lock is stale (its process is gone)."""
    try:
        holder = json.loads(path.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # unreadable: being written this instant, or left by a writer killed in between
        try:
            is_fresh = time.time() - path.stat().st_mtime < _UNREADABLE_LOCK_GRACE_SECONDS
        except FileNotFoundError:
            return None
        return {"pid": "?", "host": "?", "started": "just now", "command": ""} if is_fresh else None
    if host != socket.gethostname():
        return holder  # another machine's process: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process
        return holder
    return holder


def open_run_file(path: Path, mode: str = "r") -> h5py.File:
    """Open ``run.h5``; a clear :class:`StoreError` for missing or damaged files."""
    if not path.is_file():
        msg = f"no run file at {path}"
        raise StoreError(msg)
    try:
        # readers take no lock, so that render and inspect work on a run that is still being written
        f = h5py.File(path, mode, locking=False) if mode == "r" else h5py.File(path, mode)
    except OSError as e:
        msg = f"cannot open {path} ({e}); it may be damaged by a killed writer: rerun with --overwrite"
        raise StoreError(msg) from e
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        msg = f"{path} has schema version {version}, this xclip reads {SCHEMA_VERSION}: attribute it again with this version (--overwrite)"
        raise StoreError(msg)
    return f


@contextmanager
def damaged_file_errors(path: Path) -> Iterator[None]:
    """h5py's errors while reading an open run file (a damaged chunk, a broken heap) as one :class:`StoreError`
    naming the file; h5py raises them as ``OSError`` (without an errno) or ``KeyError``, without saying which file."""
    try:
        yield
    except (OSError, KeyError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the operating system's (a full disk): not the file's
            raise
        msg = f"cannot read {path}: the file is damaged ({e}); a killed writer or a failing disk can do this"
        raise StoreError(msg) from e


def pending(group: h5py.Group) -> np.ndarray:
    """Indices of items not yet done (pending or failed items are retried by a rerun)."""
    return np.flatnonzero(group["status"][:] != DONE)


def mark_failed(group: h5py.Group, index: int, reason: str) -> None:
    group["error"][index] = reason
    group["status"][index] = FAILED


def write_contributions(group: h5py.Group, index: int, item: Contributions) -> None:
    """One caption's or image's results; the status is set last."""
    n = item.values.shape[0]
    values = np.full(group["contributions"].shape[1:], np.nan, dtype="f4")
    values[:n] = item.values.float().cpu().numpy()
    group["contributions"][index] = values
    group["embedding"][index] = item.embedding.float().cpu().numpy()
    group["reference_embedding"][index] = item.reference_embedding.float().cpu().numpy()
    group["completeness_error"][index] = item.completeness_error
    group["relative_completeness_error"][index] = item.relative_completeness_error
    group["difference_norm"][index] = item.difference_norm
    group["n_nodes"][index] = item.n_nodes
    group["is_converged"][index] = item.is_converged
    group["error"][index] = ""
    group["status"][index] = DONE


def write_caption_tokens(group: h5py.Group, index: int, token_ids: Sequence[int], item: Contributions) -> None:
    n = len(item.labels)
    ids = np.full(group["token_ids"].shape[1], -1, dtype="i4")
    ids[:n] = token_ids[:n]
    group["token_ids"][index] = ids
    group["tokens"][index] = np.array(item.labels + [""] * (group["tokens"].shape[1] - n), dtype=object)
    group["n_positions"][index] = n
    group["is_truncated"][index] = item.is_truncated


def read_contributions(group: h5py.Group, index: int, *, labels: list[str], grid: tuple[int, int] | None,
                       n_prefix: int, n_positions: int) -> Contributions:
    """One stored caption's or image's contributions, as the engine returned them (in float32)."""
    import torch

    return Contributions(
        modality="image" if grid is not None else "text",
        values=torch.from_numpy(group["contributions"][index, :n_positions]),
        embedding=torch.from_numpy(group["embedding"][index]),
        reference_embedding=torch.from_numpy(group["reference_embedding"][index]),
        labels=labels,
        grid=grid,
        n_prefix=n_prefix,
        completeness_error=float(group["completeness_error"][index]),
        difference_norm=float(group["difference_norm"][index]),
        n_nodes=int(group["n_nodes"][index]),
        is_converged=bool(group["is_converged"][index]),
    )


def write_pair(group: h5py.Group, index: int, item: InteractionMap) -> None:
    values = np.full(group["interactions"].shape[1:], np.nan, dtype="f4")
    rows, columns = item.interactions.shape
    values[:rows, :columns] = item.interactions.float().cpu().numpy()
    group["interactions"][index] = values
    group["score"][index] = item.score
    group["terms"][index] = item.terms.float().cpu().numpy()
    group["four_term_value"][index] = item.four_term_value
    group["completeness_error"][index] = item.completeness_error
    group["relative_completeness_error"][index] = item.relative_completeness_error
    group["completeness_bound"][index] = item.completeness_bound
    group["error"][index] = ""
    group["status"][index] = DONE


def merge_shards(directory: Path, *, allow_partial: bool = False, block: int = 1024) -> Path:
    """Concatenate ``directory/shard-*-of-N/run.h5`` into ``directory/run.h5`` (written to a temporary file,
    then renamed). Pair indices are shifted onto the merged caption and image rows.

    Refused with a :class:`StoreError`: shards of different splits, a missing shard, shards made with different
    settings or weights (the differing keys are named), and shards with unfinished pairs unless
    ``allow_partial`` (their pairs then stay pending in the merged file, which records ``is_partial``).
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
        return _merge(directory, shards, allow_partial, block)


def _check_shards(shards: list[Path], allow_partial: bool) -> None:
    """Shards must share every setting that changes results, and be finished (unless ``allow_partial``)."""
    from xclip.config import settings_differences

    unfinished = []
    first: dict[str, Any] = {}
    for path in shards:
        with open_run_file(path) as f:
            fingerprint = json.loads(f.attrs["fingerprint"])
            fingerprint["runtime"].pop("shard_index", None)  # the one setting shards differ in
            identity = {
                "fingerprint": json.dumps(fingerprint, sort_keys=True),
                "weights": f.attrs.get("model_weights_sha256", ""),
                "data": f.attrs["data_sha256"],
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
            elif identity["data"] != first["data"]:
                msg = f"{path} was made from other data files than {first['path']} (data sha256 differ: the files changed between the shards' runs)"
                raise StoreError(msg)
            n_pending = int((f["pairs/status"][:] == PENDING).sum())
            if n_pending:
                unfinished.append(f"{path.parent.name}: {n_pending} of {len(f['pairs/status'])} pairs")
    if unfinished and not allow_partial:
        msg = "unfinished shards (rerun their `xclip attribute --shard I/N` to finish them, or merge with --allow-partial to keep those pairs pending): " + "; ".join(unfinished)
        raise StoreError(msg)


def _merge(directory: Path, shards: list[Path], allow_partial: bool, block: int) -> Path:
    target = directory / "run.h5"
    temporary = target.with_suffix(".h5.tmp")
    temporary.unlink(missing_ok=True)
    sources = [open_run_file(path) for path in shards]
    try:
        with h5py.File(temporary, "w-") as merged:
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
                    group.create_dataset(
                        name, shape=(sum(totals), *dataset.shape[1:]), dtype=dataset.dtype, chunks=dataset.chunks,
                        compression=dataset.compression, shuffle=dataset.shuffle, fillvalue=dataset.fillvalue,
                    )
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
    finally:
        for src in sources:
            src.close()
    temporary.replace(target)
    return target
