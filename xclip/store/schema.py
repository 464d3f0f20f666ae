"""The run file's schema in one place: its version, item statuses, group names and one declaration per column.

A :class:`Column` says all the store needs of a dataset: its name and groups, its dtype, the shape of one item's
row as a function of the run's sizes, what it is written from, what fills it, and whether the item's checksum
covers it. The store derives the rest from :data:`COLUMNS`: the datasets :mod:`xclip.store.create` makes and the
size :mod:`xclip.store.space` estimates before making them, what :mod:`xclip.store.writer` writes of an item's
results and :mod:`xclip.store.reader` reads back into them, the checksums and the merges. Readers outside the
store name datasets through the name constants below, so that a column is spelled once. A new column is one
declaration here, a new :data:`SCHEMA_VERSION`, and its row in docs/run-file.md (tests/test_pipeline.py holds
that table to the file).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from math import prod
from typing import Any, NamedTuple

import h5py
import numpy as np

SCHEMA_VERSION = 7
RUN_FILE = "run.h5"

CAPTIONS, IMAGES, PAIRS = "captions", "images", "pairs"
GROUPS = (CAPTIONS, IMAGES, PAIRS)
INPUTS = (CAPTIONS, IMAGES)
ROOT = "/"  # the file's own group: what belongs to no item


class Status(IntEnum):
    """An item's ``status`` byte: 0 pending, 1 done, 2 failed (its reason in ``error``)."""

    PENDING = 0
    DONE = 1
    FAILED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


PENDING, DONE, FAILED = Status.PENDING, Status.DONE, Status.FAILED

# per-pair numbers; an unfinished pair holds zeros (its status says it is not done: read that first)
SCORE, FOUR_TERM_VALUE, COMPLETENESS_ERROR = "score", "four_term_value", "completeness_error"
RELATIVE_COMPLETENESS_ERROR, COMPLETENESS_BOUND = "relative_completeness_error", "completeness_bound"
MAP_ERROR_BOUND = "map_error_bound"  # relative Frobenius; per input and per pair (NaN for fixed rules)
PAIR_NUMBERS = (SCORE, FOUR_TERM_VALUE, COMPLETENESS_ERROR, RELATIVE_COMPLETENESS_ERROR, COMPLETENESS_BOUND, MAP_ERROR_BOUND)
PAIR_TABLE_NUMBERS = PAIR_NUMBERS[:4]  # the columns of the pair tables (inspect, the viewer)
CAPTION_INDEX, IMAGE_INDEX = "caption_index", "image_index"
TERMS, INTERACTIONS = "terms", "interactions"
# per-input columns shared by captions and images
DIFFERENCE_NORM = "difference_norm"
INPUT_NUMBERS = (COMPLETENESS_ERROR, RELATIVE_COMPLETENESS_ERROR, DIFFERENCE_NORM)
CONTRIBUTIONS, EMBEDDING, REFERENCE_EMBEDDING = "contributions", "embedding", "reference_embedding"
N_NODES, IS_CONVERGED, STATUS, ERROR = "n_nodes", "is_converged", "status", "error"
N_ENDPOINTS = "n_endpoints"
# captions: the text, and per position its token id and string, character span and flags
TEXT, TOKEN_IDS, TOKENS, OFFSETS, SPECIAL, UNKNOWN = "text", "token_ids", "tokens", "offsets", "special", "unknown"
N_POSITIONS, IS_TRUNCATED = "n_positions", "is_truncated"
# images: the path under the data root, the size as read, notes, and the preprocessing geometry
PATH, ORIGINAL_SIZE, NOTES, PREPROCESSING = "path", "original_size", "notes", "preprocessing"
# images: the file as it was read, to tell when it changed (digests.FileIdentity)
SHA256, FILE_SIZE, MTIME_NS = "sha256", "file_size", "mtime_ns"
# every group: a CRC-32 of an item's stored results, checked when they are read (zeroed or altered bytes)
CHECKSUM = "checksum"
PREPROCESSING_COLUMNS = (
    "original_width", "original_height", "crop_x0", "crop_y0", "crop_x1", "crop_y1", "input_width", "input_height",
    "grid_rows", "grid_columns",
)
REJECTED_RECORDS = "rejected_records"
# summary runs (output.contributions: none): the tokenizer's token strings, once, instead of each caption's
VOCABULARY = "vocabulary"
# summary runs: per pair and caption position, the facts of xclip.attribution.summary.TokenSummary, and the pair's
# largest cells (PairSummary); each column's summary field is its SUMMARY_FIELDS entry
TOKEN_VALUES, PEAK_PATCH, PEAK_VALUE, TOP_SHARE = "token_values", "peak_patch", "peak_value", "top_share"
ENTROPY, CENTROID, SPREAD, TOP_CELLS, TOP_CELL_VALUES = "entropy", "centroid", "spread", "top_cells", "top_cell_values"
SUMMARY_FIELDS = {TOKEN_VALUES: "values", PEAK_PATCH: "peak_patch", PEAK_VALUE: "peak_value", TOP_SHARE: "top_share",
                  ENTROPY: "entropy", CENTROID: "centroid", SPREAD: "spread", TOP_CELLS: "top_cells",
                  TOP_CELL_VALUES: "top_cell_values"}


class Sizes(NamedTuple):
    """The sizes of a run that shape its rows (the numbers of captions, images and pairs count the rows)."""

    text_positions: int  # L: the model's text context
    image_positions: int  # S: an image's prefix positions (CLS) and patches
    embedding_dim: int  # E
    n_top_cells: int = 0  # k: the cells a summary run keeps of each pair's map (output.top_cells, at most L x S)


# a row's dimensions: numbers, or these names of the run's sizes
OWN_POSITIONS = "positions"  # the item's own: L for a caption, S for an image
TEXT_POSITIONS, IMAGE_POSITIONS, EMBEDDING_DIM, N_TOP_CELLS = Sizes._fields

# dtypes that depend on the run, beside numpy's own
ARRAY = "array"  # contributions and maps: output.precision's float (float16 halves the file)
NUMBER = "number"  # every other float: float64 in a float64 run (as exact as the API), float32 otherwise
STRING = h5py.string_dtype()  # variable-length UTF-8: only for text given when the file is created


def fixed_utf8(size: int) -> np.dtype:
    """UTF-8 of at most ``size`` bytes: text written during a run has a fixed length, so that it is stored in place."""
    return h5py.string_dtype("utf-8", size)


class RunInputs(NamedTuple):
    """What a run is given when its file is created."""

    captions: Sequence[str]
    images: Sequence[str]  # paths relative to the data root
    pairs: np.ndarray  # (P, 2) int64: caption index, image index
    rejected_records: Sequence[str]
    vocabulary: Sequence[str] = ()  # token strings by id: a summary run's, which stores no caption's own

    def n_rows(self, group: str) -> int:
        """Rows of ``group``'s datasets (the root's given text has its own lengths)."""
        return len({CAPTIONS: self.captions, IMAGES: self.images, PAIRS: self.pairs, ROOT: self.rejected_records}[group])


class RunKind(NamedTuple):
    """What a run keeps of its results, which decides the columns its file has."""

    stores_contributions: bool = True  # output.contributions: store; else summaries only (none)
    stores_pair_maps: bool = False  # output.pair_maps (only beside contributions)

    @classmethod
    def of(cls, store_contributions: bool, store_pair_maps: bool) -> RunKind:
        """The kind a run's settings ask for: pair maps are kept only beside contributions (a summary run's pairs
        keep their summaries instead)."""
        return cls(store_contributions, store_pair_maps and store_contributions)

    def keeps(self, column: Column) -> bool:
        if column.is_map and not self.stores_pair_maps:
            return False
        if column.is_contributions and not self.stores_contributions:
            return False
        return not (column.is_summary and self.stores_contributions)


FULL_RUN = RunKind()  # contributions, no pair maps
SUMMARY_RUN = RunKind(stores_contributions=False)


@dataclass(frozen=True)
class Column:
    """One dataset of the run file, the same in each of its ``groups``.

    It is written from one of three sources. ``given``: the run's inputs, once, when the file is created. An
    item's result when the item is written (a caption's or image's ``Contributions``, a pair's ``PairNumbers`` or
    ``InteractionMap``): its attribute ``result_field``, which readers pass back to the result's constructor
    where it is one of its fields; or ``from_result(result, beside)``, where ``beside`` is what the run stores
    beside the result (a caption's token ids, an image's ``ImageSource``, nothing for a pair). Neither: the
    store's own bookkeeping (status, error, checksum).
    """

    name: str
    groups: tuple[str, ...]
    dtype: Any  # a numpy dtype, ARRAY, NUMBER, STRING or fixed_utf8(size)
    shape: tuple[int | str, ...]  # one item's row: numbers, OWN_POSITIONS and the fields of Sizes
    meaning: str
    given: Callable[[RunInputs], Any] | None = None
    result_field: str | None = None
    from_result: Callable[[Any, Any], Any] | None = None
    # HDF5's fill value, and what pads a row past its item's own length (None: zeros); unfinished items hold
    # zeros whatever it is (it is recorded, never written)
    fill: Any = None
    # the item's checksum covers it; a group's checksummed columns are covered in the order declared here,
    # which is part of the file's format
    is_checksummed: bool = False
    row_of: str | None = None  # it holds row indices of that group (shifted when shards merge)
    is_map: bool = False  # only in runs that store pair maps (output.pair_maps)
    is_contributions: bool = False  # only in runs that store contributions (output.contributions: store)
    is_summary: bool = False  # only in runs that keep summaries instead (output.contributions: none)
    # the dtype in summary runs where it differs: narrower text where a summary run's few bytes per pair matter
    summary_dtype: Any = None
    attributes: tuple[tuple[str, str], ...] = ()  # the dataset's HDF5 attributes

    @property
    def is_result(self) -> bool:
        return self.result_field is not None or self.from_result is not None

    def value(self, result: Any, beside: Any) -> Any:
        """What the column holds of an item with ``result`` (and ``beside``): one row, unpadded."""
        return self.from_result(result, beside) if self.from_result is not None else getattr(result, str(self.result_field))

    def row_shape(self, group: str, sizes: Sizes) -> tuple[int, ...]:
        own = sizes.text_positions if group == CAPTIONS else sizes.image_positions
        return tuple(d if isinstance(d, int) else own if d == OWN_POSITIONS else getattr(sizes, d) for d in self.shape)

    def storage_dtype(self, precision: str, kind: RunKind = FULL_RUN) -> np.dtype:
        """The dtype stored in a run of ``output.precision`` ``precision`` (float64, float32 or float16) and ``kind``."""
        dtype = self.summary_dtype if self.summary_dtype is not None and not kind.stores_contributions else self.dtype
        if isinstance(dtype, str) and dtype == ARRAY:
            return np.dtype({"float64": "f8", "float32": "f4", "float16": "f2"}[precision])
        if isinstance(dtype, str) and dtype == NUMBER:
            return np.dtype("f8" if precision == "float64" else "f4")
        return np.dtype(dtype)

    def n_bytes(self, group: str, n_rows: int, sizes: Sizes, precision: str, kind: RunKind = FULL_RUN) -> int:
        """The bytes a fixed-size column takes in ``group`` (HDF5 allocates them when it creates the dataset)."""
        return n_rows * prod(self.row_shape(group, sizes)) * self.storage_dtype(precision, kind).itemsize


def _summary_row(name: str) -> Callable[[Any, Any], Any]:
    """A summary column's value: its field of the pair's summary rows, which a summary run writes beside the pair's
    numbers (a mapping of PairSummaries' array names to the pair's padded rows)."""
    field = SUMMARY_FIELDS[name]
    return lambda _, summary: summary[field]


_NAN = float("nan")
COLUMNS = (
    Column(TEXT, (CAPTIONS,), STRING, (), "caption", given=lambda inputs: list(inputs.captions)),
    Column(TOKEN_IDS, (CAPTIONS,), "i4", (OWN_POSITIONS,), "token ids, -1 past n_positions",
           from_result=lambda result, token_ids: list(token_ids)[: len(result.labels)], fill=-1),
    Column(TOKENS, (CAPTIONS,), fixed_utf8(48), (OWN_POSITIONS,), "token strings",
           from_result=lambda result, _: result.labels, is_contributions=True),
    # a caption holds at most MAX_CAPTION_CHARS (10,000) characters: int16 holds every span
    Column(OFFSETS, (CAPTIONS,), "i4", (OWN_POSITIONS, 2),
           "each token's character span [start, end) in the caption; 0, 0 for special tokens (int16 in summary runs)",
           from_result=lambda result, _: result.caption_tokens.offsets, summary_dtype="i2"),
    Column(SPECIAL, (CAPTIONS,), "?", (OWN_POSITIONS,), "special tokens (BOS, EOS, padding), which belong to no word",
           from_result=lambda result, _: result.caption_tokens.special),
    Column(UNKNOWN, (CAPTIONS,), "?", (OWN_POSITIONS,), "the tokenizer's unknown token (its span still names the word)",
           from_result=lambda result, _: result.caption_tokens.unknown),
    Column(N_POSITIONS, (CAPTIONS,), "i4", (), "positions with contributions (BOS..EOS; all 64 for SigLIP)",
           from_result=lambda result, _: len(result.labels)),
    Column(IS_TRUNCATED, (CAPTIONS,), "?", (), "cut to the context length", result_field="is_truncated"),
    Column(PATH, (IMAGES,), STRING, (), "path relative to data.root", given=lambda inputs: list(inputs.images)),
    Column(ORIGINAL_SIZE, (IMAGES,), "i4", (2,), "width, height before preprocessing (after EXIF orientation)",
           from_result=lambda result, _: result.geometry.original_size),
    Column(PREPROCESSING, (IMAGES,), "f8", (len(PREPROCESSING_COLUMNS),),
           "where the patches lie: original size, the crop box in original pixels, input size, grid (its columns attribute)",
           from_result=lambda result, _: result.geometry.to_row(), fill=_NAN,
           attributes=(("columns", json.dumps(PREPROCESSING_COLUMNS)),)),
    Column(NOTES, (IMAGES,), fixed_utf8(200), (),
           "what was done to read the image (EXIF orientation applied, ...); 100 bytes in summary runs",
           from_result=lambda _, source: "; ".join(source.notes), summary_dtype=fixed_utf8(100)),
    Column(SHA256, (IMAGES,), "S64", (), "SHA-256 of the image file as it was read (hex)",
           from_result=lambda _, source: source.file.sha256),
    Column(FILE_SIZE, (IMAGES,), "i8", (), "its size in bytes then", from_result=lambda _, source: source.file.size),
    Column(MTIME_NS, (IMAGES,), "i8", (), "its modification time then (ns)",
           from_result=lambda _, source: source.file.mtime_ns),
    Column(CONTRIBUTIONS, INPUTS, ARRAY, (OWN_POSITIONS, EMBEDDING_DIM),
           "contribution vectors, NaN past the item's positions (an image's CLS, then its patches row by row)",
           result_field="values", fill=_NAN, is_checksummed=True, is_contributions=True),
    Column(EMBEDDING, INPUTS, NUMBER, (EMBEDDING_DIM,), "normalised embedding", result_field="embedding", fill=_NAN,
           is_checksummed=True, is_contributions=True),
    Column(REFERENCE_EMBEDDING, INPUTS, NUMBER, (EMBEDDING_DIM,), "normalised embedding of the reference",
           result_field="reference_embedding", fill=_NAN, is_checksummed=True, is_contributions=True),
    Column(COMPLETENESS_ERROR, INPUTS, NUMBER, (), "norm of sum(contributions) minus the embedding difference",
           result_field="completeness_error", fill=_NAN),
    Column(RELATIVE_COMPLETENESS_ERROR, INPUTS, NUMBER, (), "completeness_error / difference_norm",
           result_field="relative_completeness_error", fill=_NAN),
    Column(DIFFERENCE_NORM, INPUTS, NUMBER, (), "norm of the embedding difference g(x) - g(r)",
           result_field="difference_norm", fill=_NAN),
    Column(N_NODES, INPUTS, "i4", (), "integrand evaluations the quadrature spent on the input", result_field="n_nodes"),
    Column(N_ENDPOINTS, INPUTS, "i4", (), "panel edges the adaptive rule evaluated (plain forward passes above the cut)",
           result_field="n_endpoints"),
    Column(MAP_ERROR_BOUND, INPUTS, NUMBER, (),
           "the adaptive rule's bound on the contributions' relative (Frobenius) error; NaN for a fixed rule",
           result_field="map_error_bound", fill=_NAN),
    Column(IS_CONVERGED, INPUTS, "?", (), "the relative completeness error and the map error bound met the tolerance",
           result_field="is_converged"),
    Column(CAPTION_INDEX, (PAIRS,), "i8", (), "row in captions", given=lambda inputs: inputs.pairs[:, 0],
           row_of=CAPTIONS),
    Column(IMAGE_INDEX, (PAIRS,), "i8", (), "row in images", given=lambda inputs: inputs.pairs[:, 1], row_of=IMAGES),
    Column(INTERACTIONS, (PAIRS,), ARRAY, (TEXT_POSITIONS, IMAGE_POSITIONS), "token x position interactions, NaN padded",
           result_field="interactions", fill=_NAN, is_checksummed=True, is_map=True),
    Column(TERMS, (PAIRS,), NUMBER, (4,), "cos(a,b), cos(r_a,b), cos(a,r_b), cos(r_a,r_b)", result_field="terms",
           fill=_NAN, is_checksummed=True),
    Column(SCORE, (PAIRS,), NUMBER, (), "the model's cosine (times the logit scale if scale_by_logit)",
           result_field="score", fill=_NAN, is_checksummed=True),
    Column(FOUR_TERM_VALUE, (PAIRS,), NUMBER, (), "terms[0] - terms[1] - terms[2] + terms[3]",
           result_field="four_term_value", fill=_NAN, is_checksummed=True),
    Column(COMPLETENESS_ERROR, (PAIRS,), NUMBER, (), "abs(sum of interactions - four_term_value)",
           result_field="completeness_error", fill=_NAN, is_checksummed=True),
    Column(RELATIVE_COMPLETENESS_ERROR, (PAIRS,), NUMBER, (),
           "completeness_error over the two inputs' difference_norm product", result_field="relative_completeness_error",
           fill=_NAN, is_checksummed=True),
    Column(COMPLETENESS_BOUND, (PAIRS,), NUMBER, (), "the most completeness_error can be given the two inputs' errors",
           result_field="completeness_bound", fill=_NAN, is_checksummed=True),
    Column(MAP_ERROR_BOUND, (PAIRS,), NUMBER, (),
           "a bound on the pair map's relative (Frobenius) error, from its two inputs' bounds (NaN for a fixed rule)",
           result_field="map_error_bound", fill=_NAN, is_checksummed=True),
    # summary runs: what each pair's map says (xclip.attribution.summary), written from the pair's summary rows
    *(Column(name, (PAIRS,), dtype, shape, meaning, from_result=_summary_row(name), fill=fill, is_checksummed=True,
             is_summary=True) for name, dtype, shape, fill, meaning in (
        (TOKEN_VALUES, NUMBER, (TEXT_POSITIONS,), _NAN,
         "per caption position: the sum of its row of the map (every image position), NaN past n_positions"),
        (PEAK_PATCH, "i2", (TEXT_POSITIONS,), -1, "per position: its largest patch (row-major on the grid), -1 past n_positions"),
        (PEAK_VALUE, NUMBER, (TEXT_POSITIONS,), _NAN, "per position: that patch's value"),
        (TOP_SHARE, "f2", (TEXT_POSITIONS,), _NAN,
         "per position: positive mass in its output.top_patches largest patches over its positive mass on patches (NaN: none)"),
        (ENTROPY, "f2", (TEXT_POSITIONS,), _NAN,
         "per position: entropy of its positive mass over patches / log(patches): 0 one patch, 1 even (NaN: none)"),
        (CENTROID, "f2", (TEXT_POSITIONS, 2), _NAN,
         "per position: mass-weighted mean (row, column) of patch centres, in [0, 1] of the grid (NaN: none)"),
        (SPREAD, "f2", (TEXT_POSITIONS,), _NAN,
         "per position: mass-weighted RMS distance of patch centres from the centroid, same units (NaN: none)"),
        (TOP_CELLS, "i4", (N_TOP_CELLS,), -1,
         "the map's output.top_cells largest cells as flat indices position * S + image position, largest first"),
        (TOP_CELL_VALUES, NUMBER, (N_TOP_CELLS,), _NAN, "their values"),
    )),
    Column(CHECKSUM, GROUPS, "u4", (), "CRC-32 of the item's checksummed columns as stored, checked when they are read"),
    Column(STATUS, GROUPS, "i1", (), "0 pending, 1 done, 2 failed", fill=PENDING),
    Column(ERROR, INPUTS, fixed_utf8(400), (), "why it failed (its first 128 bytes in summary runs)",
           summary_dtype=fixed_utf8(128)),
    Column(ERROR, (PAIRS,), fixed_utf8(100), (), "why it failed (names the failed caption or image)"),
    Column(REJECTED_RECORDS, (ROOT,), STRING, (), "records of the data files that name no usable pair, as file:line: reason",
           given=lambda inputs: list(inputs.rejected_records)),
    Column(VOCABULARY, (ROOT,), STRING, (), "summary runs: the tokenizer's token strings by token id (captions' tokens)",
           given=lambda inputs: list(inputs.vocabulary), is_summary=True),
)


def columns_of(group: str, kind: RunKind) -> tuple[Column, ...]:
    """The columns of ``group`` a run of ``kind`` has, in declaration order."""
    return tuple(column for column in COLUMNS if group in column.groups and kind.keeps(column))


def kind_of(f: h5py.File) -> RunKind:
    """The kind of the run in the open run file ``f``, from the columns it has."""
    return RunKind(stores_contributions=CONTRIBUTIONS in f[CAPTIONS], stores_pair_maps=INTERACTIONS in f[PAIRS])
