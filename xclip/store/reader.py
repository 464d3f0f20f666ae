"""Reading a run file by item: what inspect, render, evaluate, view and explain read it through."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xclip.attribution.result import Contributions, InteractionMap, PairNumbers
from xclip.attribution.summary import PairSummary, pair_summary_from_rows, summarise_map
from xclip.core.geometry import Preprocessing, position_labels
from xclip.core.tokens import CaptionTokens
from xclip.disk.archives import ArchiveMembers, is_present
from xclip.disk.digests import FileIdentity, has_changed
from xclip.errors import ConfigError
from xclip.store import schema
from xclip.store.layout import checked_block, checked_rows, damaged_file_errors, open_run_file, run_file_path
from xclip.store.schema import (
    CAPTION_INDEX,
    CAPTIONS,
    DIFFERENCE_NORM,
    DONE,
    FILE_SIZE,
    IMAGE_INDEX,
    IMAGES,
    INTERACTIONS,
    IS_TRUNCATED,
    MTIME_NS,
    N_POSITIONS,
    OFFSETS,
    OWN_POSITIONS,
    PAIRS,
    PATH,
    PREPROCESSING,
    REJECTED_RECORDS,
    SHA256,
    SPECIAL,
    STATUS,
    SUMMARY_FIELDS,
    TEXT,
    TOKEN_IDS,
    TOKENS,
    UNKNOWN,
    VOCABULARY,
    RunKind,
    Status,
)

if TYPE_CHECKING:
    from PIL import Image

    from xclip.config import RunConfig


class RunReader:
    """Read access to a run file, for inspect, render and evaluate: what the file holds, by item.

    It never takes the writer lock, so it works on a run that is still being written (it shows what is
    finished). Every h5py error while reading becomes a :class:`StoreError` naming the file. A pair's map is
    read when the run stored maps (``output.pair_maps``), and computed from the two stored contribution arrays
    otherwise, through :func:`xclip.interaction_map`: readers see the same map either way. A summary run
    (``output.contributions: none``) has neither: its pairs' numbers and summaries (:meth:`pair_summary`) are read,
    and what needs a map or contributions raises :class:`NeedsContributions`.
    """

    _mode = "r"

    def __init__(self, run_dir: str | Path, *, archives: ArchiveMembers | None = None) -> None:
        self.path = run_file_path(run_dir)
        self._file = open_run_file(self.path, self._mode)
        with self._reading():
            self.attrs: dict[str, Any] = dict(self._file.attrs)
            self.config: dict[str, Any] = json.loads(self.attrs["config"])
            self.grid: tuple[int, int] = tuple(int(v) for v in self._file[IMAGES].attrs["grid"])  # type: ignore[assignment]
            self.n_prefix = int(self._file[IMAGES].attrs["n_prefix"])
            self.kind: RunKind = schema.kind_of(self._file)
        self.has_pair_maps = self.kind.stores_pair_maps
        self._fixed: dict[str, Any] = {}  # what a run never changes after creating the file, read once
        # images inside tar and parquet files: each archive indexed once for all the images this reader reads, or
        # for all its caller's readers (``archives``, which the caller keeps and closes: the viewer's)
        self._archives = archives or ArchiveMembers()
        self._owns_archives = archives is None

    def __enter__(self):  # noqa: ANN204  (the subclass's own type; typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        if self._owns_archives:
            self._archives.close()

    @property
    def stores_contributions(self) -> bool:
        """The run stored its inputs' contributions (``output.contributions: store``), so that maps and figures can
        be read; False for a summary run, which keeps each pair's numbers and :meth:`pair_summary` only."""
        return self.kind.stores_contributions

    def columns(self, group: str) -> tuple[schema.Column, ...]:
        """The declared columns of ``group`` that this run's file has."""
        return schema.columns_of(group, self.kind)

    def require_contributions(self, what: str) -> None:
        """Raise :class:`NeedsContributions` (``what`` needs them) unless the run stored contributions."""
        if not self.stores_contributions:
            raise NeedsContributions(needs_contributions_message(what, self.path))

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with damaged_file_errors(self.path):
            yield

    def status(self, group: str) -> np.ndarray:
        """Status per item of ``captions``, ``images`` or ``pairs``: PENDING, DONE or FAILED."""
        with self._reading():
            return self._file[group][STATUS][:]

    def errors(self, group: str, indices: Sequence[int]) -> list[str]:
        """Why the given items failed, in the order of ``indices``."""
        if not len(indices):
            return []
        return [str(error) for error in self.values(group, schema.ERROR, indices, text=True)]

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
        """One per-item dataset of docs/run-file.md's table, whole (scores, errors, node counts, sizes, ...)."""
        if group == PAIRS and name in (CAPTION_INDEX, IMAGE_INDEX):
            return self._once(f"{group}/{name}", lambda: self._file[group][name][:])
        with self._reading():
            return self._file[group][name][:]

    def captions(self) -> list[str]:
        return self._once(f"{CAPTIONS}/{TEXT}", lambda: list(self._file[CAPTIONS][TEXT].asstr()[:]))

    def image_paths(self) -> list[str]:
        """Image paths relative to the data root."""
        return self._once(f"{IMAGES}/{PATH}", lambda: list(self._file[IMAGES][PATH].asstr()[:]))

    def _once(self, key: str, read: Any) -> Any:
        if key not in self._fixed:
            with self._reading():
                self._fixed[key] = read()
        return self._fixed[key]

    def rejected_records(self) -> list[str]:
        with self._reading():
            return list(self._file[REJECTED_RECORDS].asstr()[:])

    def bytes_per_item(self, group: str) -> int:
        """Bytes one item of ``captions``, ``images`` or ``pairs`` takes in the file: its rows of every
        fixed-size dataset (variable-length text, the captions and image paths, is not counted)."""
        with self._reading():
            items = self._file[group]
            n = len(items[STATUS])
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

    @property
    def logit_scale(self) -> float:
        """The factor of the run's maps and pair numbers: the model's logit scale with ``scale_by_logit``, else 1."""
        return float(self.attrs["logit_scale"]) if self.settings.attribution.scale_by_logit else 1.0

    def n_items(self, group: str) -> int:
        """How many captions, images or pairs the run has (no data read)."""
        with self._reading():
            return len(self._file[group][STATUS])

    def caption(self, caption: int) -> str:
        """One caption's text (one row read, where :meth:`captions` reads them all)."""
        with self._reading():
            return str(self._file[CAPTIONS][TEXT].asstr()[caption])

    def image_path(self, image: int) -> str:
        """One image's path relative to the data root (one row read)."""
        with self._reading():
            return str(self._file[IMAGES][PATH].asstr()[image])

    def pair_inputs(self, pair: int) -> tuple[int, int]:
        """A pair's (caption index, image index), read from its own row."""
        with self._reading():
            pairs = self._file[PAIRS]
            return int(pairs[CAPTION_INDEX][pair]), int(pairs[IMAGE_INDEX][pair])

    def caption_tokens(self, caption: int) -> CaptionTokens:
        """A finished caption's positions as its own text: token strings, character spans, flags."""
        return self.captions_tokens([caption])[0]

    def captions_tokens(self, captions: Sequence[int] | np.ndarray) -> list[CaptionTokens]:
        """:meth:`caption_tokens` of several finished captions, in the order given (repeats allowed): each column
        read once for them all, where a caption at a time costs a few reads each (hours over a million captions)."""
        distinct, order = np.unique(np.asarray(captions, dtype=np.int64), return_inverse=True)
        if not len(distinct):
            return []
        with self._reading():
            group = self._file[CAPTIONS]
            lengths = group[N_POSITIONS][distinct]
            width = int(lengths.max())
            if TOKENS in group:
                tokens = group[TOKENS].asstr()[distinct, :width]
            else:  # a summary run keeps token ids and the tokenizer's strings once: the same strings
                vocabulary = self._once(VOCABULARY, lambda: self._file[VOCABULARY].asstr()[:])
                tokens = vocabulary[group[TOKEN_IDS][distinct, :width]]  # -1 past a caption's positions: cut below
            texts = group[TEXT].asstr()[distinct]
            offsets, special, unknown = (group[name][distinct, :width] for name in (OFFSETS, SPECIAL, UNKNOWN))
        read = [
            CaptionTokens(
                caption=str(texts[k]),
                tokens=[str(token) for token in tokens[k, :n]],
                offsets=[(int(a), int(b)) for a, b in offsets[k, :n]],
                special=[bool(v) for v in special[k, :n]],
                unknown=[bool(v) for v in unknown[k, :n]],
            )
            for k, n in enumerate(lengths)
        ]
        return [read[k] for k in order.reshape(-1)]

    def image_file(self, image: int) -> FileIdentity:
        """The file a finished image was read from: its size, modification time and content digest."""
        with self._reading():
            group = self._file[IMAGES]
            return FileIdentity(int(group[FILE_SIZE][image]), int(group[MTIME_NS][image]), group[SHA256][image].decode())

    def preprocessing(self, image: int) -> Preprocessing:
        """Where a finished image's patches lie in the original image."""
        with self._reading():
            return Preprocessing.from_row(self._file[IMAGES][PREPROCESSING][image])

    def image_labels(self) -> list[str]:
        """An image's position labels, as the engine gives them (:func:`xclip.core.geometry.position_labels`)."""
        return position_labels(self.n_prefix, self.grid)

    def contributions(self, group: str, index: int) -> Contributions:
        """A finished caption's (``captions``) or image's (``images``) contributions, as the engine gave them (in
        float32, or float64 in a float64 run), checked against the item's checksum."""
        self.require_contributions(f"the contributions of {group[:-1]} {index}")
        with self._reading():
            stored = _columns_of(Contributions, self.columns(group))
            rows = checked_rows(self._file, group, index, [column.name for column in stored])
            if group == CAPTIONS:
                tokens = self.caption_tokens(index)
                return Contributions(modality="text", labels=tokens.tokens, caption_tokens=tokens,
                                     **_read_back(stored, rows, n_positions=len(tokens)))
            labels = self.image_labels()
            return Contributions(modality="image", labels=labels, grid=self.grid, n_prefix=self.n_prefix,
                                 geometry=self.preprocessing(index), **_read_back(stored, rows, n_positions=len(labels)))

    def interactions(self, pair: int) -> np.ndarray:
        """A finished pair's token x image-position map, ``(n_tokens, S)`` (CLS columns first)."""
        self.require_contributions(f"the map of pair {pair}")
        caption, image = self.pair_inputs(pair)
        if self.has_pair_maps:
            with self._reading():
                return self._stored_map(checked_rows(self._file, PAIRS, pair)[INTERACTIONS], caption)
        return self._computed_map(caption, image)

    def _stored_map(self, row: np.ndarray, caption: int) -> np.ndarray:
        n = int(self._file[CAPTIONS][N_POSITIONS][caption])
        return row[:n].astype(_read_dtype(row.dtype))

    def _computed_map(self, caption: int, image: int) -> np.ndarray:
        from xclip.core.interaction import interactions

        scale = self.logit_scale
        rows, columns = self.contributions(CAPTIONS, caption).values, self.contributions(IMAGES, image).values
        # as a batch of one pair, the product xclip.interaction_maps takes: the same kernel, the same rounding
        return (interactions(rows[None], columns[None])[0] * scale).numpy()

    def pair(self, index: int) -> InteractionMap:
        """A finished pair as :func:`xclip.interaction_map` gives one: its map (see :meth:`interactions`), numbers,
        tokens, patch geometry and identity, read from the pair's own rows and its caption's and image's. So
        ``.plot(pair.image)`` draws it as ``xclip render`` does, and ``.save(path)`` keeps it.

        ``caption_index`` and ``image_index`` are its rows of the run's captions and images, ``image`` the
        image's file under the data root (see :meth:`data_root`; :meth:`image_source` checks it).

        Raises:
            ConfigError: no finished pair has that index (pending, failed, or past the run's pairs).
            StoreError: the pair's stored results are damaged (see :meth:`contributions`).
        """
        import torch

        self.require_contributions(f"the map of pair {index}")
        self._check_finished(index)
        caption, image = self.pair_inputs(index)
        tokens = self.caption_tokens(caption)
        scale = self.logit_scale
        with self._reading():
            stored = _columns_of(PairNumbers, self.columns(PAIRS))
            rows = checked_rows(self._file, PAIRS, index, [column.name for column in stored])
            interactions = self._stored_map(rows[INTERACTIONS], caption) if self.has_pair_maps else self._computed_map(caption, image)
            norms = [float(self._file[group][DIFFERENCE_NORM][item]) for group, item in ((CAPTIONS, caption), (IMAGES, image))]
            is_truncated = bool(self._file[CAPTIONS][IS_TRUNCATED][caption])
        return InteractionMap(
            **_read_back(stored, rows),
            score_scale=norms[0] * norms[1] * scale,
            interactions=torch.from_numpy(interactions),
            row_labels=tokens.tokens,
            column_labels=self.image_labels(),
            grid=self.grid,
            n_prefix=self.n_prefix,
            logit_scale=scale,
            caption_tokens=tokens,
            geometry=self.preprocessing(image),
            caption_index=caption,
            image_index=image,
            image=str(self.data_root() / self.image_path(image)),
            is_caption_truncated=is_truncated,
        )

    def pair_summary(self, index: int) -> PairSummary:
        """A finished pair's :class:`~xclip.attribution.summary.PairSummary`: read in a summary run; in a run with
        contributions computed from its map (:meth:`interactions`) with the run's ``output.top_cells`` and
        ``output.top_patches``, and rounded to the dtypes a summary run stores, so that both kinds of run give the
        same summary of the same map.

        Raises:
            ConfigError: no finished pair has that index.
            StoreError: the pair's stored results are damaged.
        """
        self._check_finished(index)
        caption, _ = self.pair_inputs(index)
        n = int(self.value(CAPTIONS, N_POSITIONS, caption))
        output = self.settings.output
        if self.stores_contributions:
            summary = summarise_map(self.interactions(index), n, self.grid, self.n_prefix,
                                    top_cells=output.top_cells, top_patches=output.top_patches)
            return _as_summary_run_stores(summary, output.storage_precision(self.settings.model.dtype))
        with self._reading():
            rows = checked_rows(self._file, PAIRS, index, list(SUMMARY_FIELDS))
        return pair_summary_from_rows(n, {field: rows[name] for name, field in SUMMARY_FIELDS.items()})

    def pair_summaries(self, indices: Sequence[int] | np.ndarray) -> list[PairSummary]:
        """:meth:`pair_summary` of finished pairs ``indices`` (increasing, distinct), equal to it pair by pair; a
        summary run reads each column once for them all, as the rows from the first to the last, so pass pairs
        that lie close together (a block of the run): what reads a million pairs' summaries in minutes, not hours.

        Raises:
            ConfigError: one of them is not a finished pair.
            StoreError: a pair's stored results are damaged.
        """
        pairs = np.asarray(indices, dtype=np.int64)
        if self.stores_contributions or not len(pairs):  # the map of each pair is computed: its read and product dominate
            return [self.pair_summary(int(pair)) for pair in pairs]
        if np.any(np.diff(pairs) <= 0):
            raise ValueError("pair_summaries takes increasing, distinct pair indices")
        for outside in (pairs[0], pairs[-1]):
            if not 0 <= outside < self.n_items(PAIRS):
                self._check_finished(int(outside))  # raises, naming it
        status = self.values(PAIRS, STATUS, pairs)
        if np.any(status != DONE):
            self._check_finished(int(pairs[np.flatnonzero(status != DONE)[0]]))
        n_positions = self.values(CAPTIONS, N_POSITIONS, self.values(PAIRS, CAPTION_INDEX, pairs))
        with self._reading():
            rows = checked_block(self._file, PAIRS, pairs, list(SUMMARY_FIELDS))
        return [pair_summary_from_rows(int(n), {field: rows[name][k] for name, field in SUMMARY_FIELDS.items()})
                for k, n in enumerate(n_positions)]

    def _check_finished(self, pair: int) -> None:
        n_pairs = self.n_items(PAIRS)
        status = Status(int(self.value(PAIRS, STATUS, pair))) if 0 <= pair < n_pairs else None
        if status != DONE:
            state = "not one of its pairs" if status is None else status.label
            msg = f"pair {pair} of {self.path} is {state}: only a finished pair can be read (the run has {n_pairs} pairs)"
            raise ConfigError(msg, setting="index")

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
        if not is_present(path):  # a file, or a member of a tar or parquet file
            msg = f"image {path}{owner} is not there: was the data moved? give the images' new folder"
            raise MissingImage(msg, setting="data_root")
        if has_changed(path, self.image_file(image), verify=self.settings.data.verify, archives=self._archives):
            msg = (f"image {stored}{owner} changed since it was attributed (its content differs from the digest in the "
                   "run file): its map is of the old picture; resume the run to attribute it again")
            raise ConfigError(msg)
        return path

    def image_picture(self, image: int, data_root: Path | None = None, *, owner: str = "") -> Image.Image:
        """The picture of :meth:`image_source`, read as the run read it (upright, RGB): a member of a tar or parquet
        file through this reader's archive index, so that drawing many of one archive's images indexes it once.

        Raises:
            MissingImage, ConfigError: as :meth:`image_source`; InputError: the file no longer reads as an image.
        """
        from xclip.models.base import read_image  # torch: only when a picture is read

        return read_image(self._archives.image(self.image_source(image, data_root, owner=owner)))[0]

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


class NeedsContributions(ConfigError):
    """What was asked of a run needs stored contributions (a map, a figure), and the run keeps summaries only."""


def needs_contributions_message(what: str, path: Path) -> str:
    """The one message of :class:`NeedsContributions`: what needs contributions, and how to get them for some pairs."""
    return (
        f"{what} needs stored contributions, and {path} keeps each pair's numbers and summary only "
        "(output.contributions: none). To draw or read maps, attribute the pairs you want again with contributions, "
        "into another directory: xclip attribute CONFIG output.contributions=store output.directory=OTHER data.limit=N "
        "(the first N pairs; or a data file listing the pairs you want)"
    )


def _as_summary_run_stores(summary: PairSummary, precision: str) -> PairSummary:
    """``summary`` with each array rounded through the dtype a summary run of ``precision`` stores it in."""
    dtypes = {SUMMARY_FIELDS[column.name]: column.storage_dtype(precision, schema.SUMMARY_RUN)
              for column in schema.columns_of(PAIRS, schema.SUMMARY_RUN) if column.name in SUMMARY_FIELDS}

    def stored(name: str, array: np.ndarray) -> np.ndarray:
        return array.astype(dtypes[name]).astype(array.dtype)

    token = summary.token
    return PairSummary(
        token=type(token)(**{f.name: stored(f.name, getattr(token, f.name)) for f in dataclasses.fields(token)}),
        top_cells=summary.top_cells,
        top_cell_values=stored("top_cell_values", summary.top_cell_values),
    )


def _columns_of(result_type: type, columns: tuple[schema.Column, ...]) -> list[schema.Column]:
    """Of a group's ``columns``, those that hold fields of ``result_type`` (its constructor's arguments)."""
    fields = {field.name for field in dataclasses.fields(result_type)}
    return [column for column in columns if column.result_field in fields]


def _read_back(columns: list[schema.Column], rows: dict[str, np.ndarray], n_positions: int | None = None) -> dict[str, Any]:
    """An item's stored rows as its result's fields: numbers as Python's, arrays as tensors, those per position cut
    to the item's ``n_positions``."""
    import torch

    fields = {}
    for column in columns:
        row = rows[column.name]
        if np.ndim(row) == 0:
            fields[str(column.result_field)] = row.item()
            continue
        if column.shape[:1] == (OWN_POSITIONS,):
            row = row[:n_positions]
        fields[str(column.result_field)] = torch.from_numpy(row.astype(_read_dtype(row.dtype)) if row.dtype.kind == "f" else row)
    return fields


def _read_dtype(dtype: np.dtype) -> type:
    """Stored arrays are read as float32, float64 ones as float64 (float16 storage only saves space)."""
    return np.float64 if dtype == np.float64 else np.float32
