"""Merging the run files of a run's shards into one, refusing shards that do not belong together."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xclip.disk.files import install_file, is_disk_full, no_space, size_text
from xclip.disk.locking import writer_lock
from xclip.errors import ConfigError, StoreError
from xclip.store import schema
from xclip.store.layout import HDF5_FILE_LOCKING, fixed_dataset, open_for_reading, open_run_file
from xclip.store.schema import DONE, GROUPS, PAIRS, PENDING, ROOT, RUN_FILE, STATUS

# the attribute a shard of a webdataset or parquet input records its own files' digest in (see xclip.run.identity)
SHARD_DATA_SHA256 = "shard_data_sha256"


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
    shards = sorted(directory.glob(f"shard-*-of-*/{RUN_FILE}"))
    if not shards:
        msg = f"no shard-*-of-*/{RUN_FILE} under {directory}"
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
        return _merge(directory, shards, block, progress)


def _check_merge_target(target: Path, shards: list[Path]) -> None:
    """Refuse to replace ``target`` unless it is absent or an earlier merge of these shards: merged from the same
    shard files, with their settings, weights and data, and as many pairs as they hold together."""
    if not target.exists():
        return
    names = [str(path.relative_to(target.parent)) for path in shards]
    n_pairs = sum(_pair_count(path) for path in shards)
    try:
        with open_for_reading(target) as held, open_run_file(shards[0]) as first:
            merged_from = json.loads(held.attrs["merged_from"]) if "merged_from" in held.attrs else None
            if merged_from == names and len(held[PAIRS][STATUS]) == n_pairs and all(
                held.attrs.get(key) == first.attrs.get(key) for key in ("fingerprint", "model_weights_sha256", "data_sha256")
            ):
                return
            model = json.loads(held.attrs["config"])["model"]["name"] if "config" in held.attrs else "?"
            statuses = f"{PAIRS}/{STATUS}"
            n_done = int((held[statuses][:] == DONE).sum()) if statuses in held else 0
            origin = "a merge of other shards or settings" if merged_from is not None else "not a merge of these shards"
            held_text = f"a run of {n_done} finished pairs of model {model} ({origin})"
    except (OSError, KeyError, ValueError) as e:
        held_text = f"a file xclip cannot read as a run ({e})"
    msg = f"{target} holds {held_text}; merging would replace it. Merge into another directory, or pass overwrite=True to replace it"
    raise ConfigError(msg, setting="overwrite")


def _pair_count(path: Path) -> int:
    with open_run_file(path) as f:
        return len(f[PAIRS][STATUS])


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
                "kind": schema.kind_of(f),
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
            elif identity["kind"] != first["kind"]:
                msg = f"{path} {_kind_text(identity['kind'])}, {first['path']} {_kind_text(first['kind'])}: shards of one run share output.contributions and output.pair_maps"
                raise StoreError(msg)
            elif identity["data"] != first["data"]:
                msg = f"{path} was made from other data files than {first['path']} (data sha256 differ: the files changed between the shards' runs)"
                raise StoreError(msg)
            n_pending = int((f[PAIRS][STATUS][:] == PENDING).sum())
            if n_pending:
                unfinished.append(f"{path.parent.name}: {n_pending} of {len(f[PAIRS][STATUS])} pairs")
    if unfinished and not allow_partial:
        msg = "unfinished shards (rerun their shard of the run to finish them, or merge with allow_partial=True to keep those pairs pending): " + "; ".join(unfinished)
        raise StoreError(msg, setting="allow_partial")


def _merge(directory: Path, shards: list[Path], block: int, progress: Callable[[int, int], None] | None) -> Path:
    target = directory / RUN_FILE
    temporary = target.with_suffix(".h5.tmp")
    temporary.unlink(missing_ok=True)
    # the merged file holds what the shards hold: their files' sizes, and a margin for HDF5's own metadata
    needed = int(1.1 * sum(path.stat().st_size for path in shards)) + 10**6
    advice = "free space, then merge again"
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise no_space(target, f"about {size_text(needed)}", free, advice=advice)
    sources = [open_run_file(path) for path in shards]
    try:
        with h5py.File(temporary, "w-", locking=HDF5_FILE_LOCKING) as merged:
            for key, value in sources[0].attrs.items():
                if key != SHARD_DATA_SHA256:  # of the first shard's files alone
                    merged.attrs[key] = value
            merged.attrs["merged_from"] = json.dumps([str(p.relative_to(directory)) for p in shards])
            merged.attrs["is_partial"] = bool(sum(int((src[PAIRS][STATUS][:] == PENDING).sum()) for src in sources))
            # every shard reads the whole data files and holds the same rows, but one of a webdataset or parquet input
            # (which has its own files' digest) those of its own files
            by_file = SHARD_DATA_SHA256 in sources[0].attrs
            for column in schema.columns_of(ROOT, schema.kind_of(sources[0])):
                rows = [src[column.name][:] for src in (sources if by_file else sources[:1])]
                merged.create_dataset(column.name, data=np.concatenate(rows), dtype=sources[0][column.name].dtype)
            _create_merged_groups(merged, sources)
            offsets = dict.fromkeys(GROUPS, 0)
            for n_copied, src in enumerate(sources, start=1):
                for group in GROUPS:
                    _copy_rows(src[group], merged[group], group, offsets, block)
                for group in GROUPS:
                    offsets[group] += len(src[group][STATUS])
                if progress is not None:
                    progress(n_copied, len(sources))
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


def _kind_text(kind: schema.RunKind) -> str:
    if not kind.stores_contributions:
        return "keeps summaries only (output.contributions: none)"
    return f"stores contributions {'and' if kind.stores_pair_maps else 'but no'} pair maps"


def _create_merged_groups(merged: h5py.File, sources: list[h5py.File]) -> None:
    """Every group's columns at the shards' summed length, in the first shard's dtypes (float16 arrays stay
    float16) and fill values."""
    for group in GROUPS:
        first = sources[0][group]
        items = merged.create_group(group)
        for key, value in first.attrs.items():
            items.attrs[key] = value
        total = sum(len(src[group][STATUS]) for src in sources)
        for column in schema.columns_of(group, schema.kind_of(sources[0])):
            dataset = first[column.name]
            shape = (total, *dataset.shape[1:])
            if column.dtype is schema.STRING:  # text of the file's creation
                items.create_dataset(column.name, shape=shape, dtype=dataset.dtype)
            else:
                fixed_dataset(items, column.name, shape, dataset.dtype, dataset.fillvalue)
            for key, value in dataset.attrs.items():
                items[column.name].attrs[key] = value


def _copy_rows(source: h5py.Group, merged: h5py.Group, group: str, offsets: dict[str, int], block: int) -> None:
    """A shard's rows of ``group`` into the merged file after the rows copied before (``offsets``), ``block`` rows
    at a time; indices of other groups' rows shifted by those groups' offsets."""
    n = len(source[STATUS])
    start = offsets[group]
    for column in schema.columns_of(group, schema.kind_of(source.file)):
        shift = offsets[column.row_of] if column.row_of is not None else 0
        dataset = source[column.name]
        for row in range(0, n, block):
            rows = dataset[row : row + block]
            merged[column.name][start + row : start + row + len(rows)] = rows + shift if shift else rows
