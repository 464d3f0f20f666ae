"""The run file's schema in one place: its version, item statuses and the names of its groups and columns.

The writer (:mod:`xclip.store.runfile`) and every reader (inspect, render, evaluate, view, explain) name datasets
through these constants, so that a column is spelled once. The README's table describes the same layout for
readers with plain h5py.
"""

from __future__ import annotations

from enum import IntEnum

SCHEMA_VERSION = 6
RUN_FILE = "run.h5"

CAPTIONS, IMAGES, PAIRS = "captions", "images", "pairs"
GROUPS = (CAPTIONS, IMAGES, PAIRS)


class Status(IntEnum):
    """An item's ``status`` byte: 0 pending, 1 done, 2 failed (its reason in ``error``)."""

    PENDING = 0
    DONE = 1
    FAILED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


# per-pair numbers, float32; an unfinished pair holds zeros (its status says it is not done: read that first)
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
