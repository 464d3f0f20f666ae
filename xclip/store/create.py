"""Creating the run file: every declared column at full size, its storage allocated and its disk space reserved
before any work is done (see :mod:`xclip.store.writer` for why that makes a run safe to kill)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xclip.store import schema
from xclip.store.layout import HDF5_FILE_LOCKING, fixed_dataset
from xclip.store.schema import GROUPS, IMAGES, ROOT, SCHEMA_VERSION, RunInputs, RunKind, Sizes
from xclip.store.space import estimated_size, refusing_a_full_disk, reserve


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
    store_contributions: bool = True,
    n_top_cells: int = 0,
    vocabulary: Sequence[str] = (),
) -> None:
    """Create ``run.h5`` with every dataset at full size (mode ``w-``: never truncates an existing file).

    ``precision`` (output.precision) is that of contributions and maps: float16 halves the file, where embeddings
    and every number stay float32; a float64 run keeps everything in float64, so that a stored map is as exact
    as the API's. Without ``store_pair_maps`` readers compute a pair's map from its two inputs' contributions.
    Without ``store_contributions`` (a summary run: no maps either) each pair keeps its numbers and its summary of
    ``n_top_cells`` cells, and captions their token ids, read as strings through ``vocabulary`` (token strings by id).
    """
    table = np.asarray(pairs, dtype=np.int64).reshape(len(pairs), 2)
    kind = RunKind.of(store_contributions, store_pair_maps)
    inputs = RunInputs(captions, images, table, rejected_records, vocabulary if not store_contributions else ())
    sizes = Sizes(max_text_positions, n_image_positions, embedding_dim, n_top_cells)
    with refusing_a_full_disk(path, estimated_size(inputs, sizes, precision, kind)):
        with h5py.File(path, "w-", locking=HDF5_FILE_LOCKING) as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            for key, value in attributes.items():
                # str() also turns str subclasses (torch's version string) into plain strings h5py can store
                f.attrs[key] = str(value) if isinstance(value, str) else value if isinstance(value, (int, float)) else json.dumps(value)
            for name in GROUPS:
                f.create_group(name)
            f[IMAGES].attrs["grid"] = grid
            f[IMAGES].attrs["n_prefix"] = n_prefix
            for group in (*GROUPS, ROOT):
                for column in schema.columns_of(group, kind):
                    _create_column(f[group], group, column, inputs, sizes, precision, kind)
        reserve(path)


def _create_column(group: h5py.Group, group_name: str, column: schema.Column, inputs: RunInputs, sizes: Sizes,
                   precision: str, kind: RunKind) -> None:
    """A column's dataset: written now from the inputs when it is given, else allocated for the run to fill."""
    dtype = column.storage_dtype(precision, kind)
    if column.given is not None:  # variable-length text is written only here: no string heap grows during a run
        data = column.given(inputs)
        dataset = group.create_dataset(column.name, data=data, dtype=dtype, shape=(len(data), *column.row_shape(group_name, sizes)))
    else:
        shape = (inputs.n_rows(group_name), *column.row_shape(group_name, sizes))
        dataset = fixed_dataset(group, column.name, shape, dtype, column.fill)
    for key, value in column.attributes:
        dataset.attrs[key] = value
