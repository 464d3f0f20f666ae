"""The HDF5 file of a run directory: flat, item-indexed datasets that plain h5py users can read.

Every dataset is created at full size when the run starts; a ``status`` column per group (0 pending, 1 done,
2 failed, with the reason in ``error``) is written after each item's data and flushed after every batch, so a
killed run keeps every finished item and a rerun completes the rest. See the README for the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xclip.errors import StoreError
from xclip.result import Contributions, InteractionMap

SCHEMA_VERSION = 3
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


def merge_shards(directory: Path, *, block: int = 1024) -> Path:
    """Concatenate ``directory/shard-*-of-N/run.h5`` into ``directory/run.h5`` (written to a temporary file,
    then renamed). Pair indices are shifted onto the merged caption and image rows; unfinished items keep
    their status, so a merge of a partial run is partial too."""
    shards = sorted(directory.glob("shard-*-of-*/run.h5"))
    if not shards:
        msg = f"no shard-*-of-*/run.h5 under {directory}"
        raise StoreError(msg)
    expected = int(shards[0].parent.name.rsplit("-", 1)[1])
    if len(shards) != expected:
        msg = f"{directory} has {len(shards)} of {expected} shards; run the missing ones first"
        raise StoreError(msg)
    target = directory / "run.h5"
    temporary = target.with_suffix(".h5.tmp")
    temporary.unlink(missing_ok=True)
    sources = [open_run_file(path) for path in shards]
    try:
        with h5py.File(temporary, "w-") as merged:
            for key, value in sources[0].attrs.items():
                merged.attrs[key] = value
            merged.attrs["merged_from"] = json.dumps([str(p.relative_to(directory)) for p in shards])
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
