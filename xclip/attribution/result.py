"""Result types: contribution vectors of one input and the interaction map of one pair."""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from xclip.errors import StoreError

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from xclip.core.geometry import Preprocessing
    from xclip.core.tokens import CaptionTokens

Modality = Literal["text", "image"]


@dataclass(frozen=True)
class Contributions:
    """Contribution vectors of one caption or image at the cut layer.

    Attributes:
        values: ``(S, E)``; row s is what position s adds to the embedding difference ``g(x) - g(r)``.
        embedding: ``(E,)`` the input's L2-normalised embedding (the model's own feature, normalised).
        reference_embedding: ``(E,)`` the reference's normalised embedding.
        labels: one label per position: token strings, or ``cls`` / ``patch(row,col)`` for images.
        grid: ``(H, W)`` patch grid for images, None for captions.
        n_prefix: positions before the patches (CLIP's CLS); 0 for captions.
        completeness_error: ``|values.sum(0) - (g(x) - g(r))|``, the quadrature error of this input.
        difference_norm: ``|g(x) - g(r)|``, the length of what the contributions sum to.
        n_nodes: integrand evaluations the quadrature spent on this input.
        n_endpoints: plain evaluations of g at panel edges (each costs a forward pass of the upper encoder).
        map_error_bound: a bound on the relative (Frobenius) error of ``values``, from the nested rules (see
            :mod:`xclip.core.quadrature`; its coverage on held-out inputs is measured by
            ``scripts/map_error_coverage.py``); NaN for a fixed rule, which has nothing to compare with.
        is_converged: the relative completeness error and the map error bound are both at most the attribution's
            tolerance (a fixed rule: the completeness error only; always True when no tolerance was set).
        is_truncated: the caption was cut to the model's context length.
        caption_tokens: a caption's positions as its own text (character spans, special flags).
        geometry: where an image's patches lie in the original image.
    """

    modality: Modality
    values: Tensor
    embedding: Tensor
    reference_embedding: Tensor
    labels: list[str]
    grid: tuple[int, int] | None = None
    n_prefix: int = 0
    completeness_error: float = 0.0
    difference_norm: float = 1.0
    n_nodes: int = 0
    n_endpoints: int = 0
    map_error_bound: float = float("nan")
    is_converged: bool = True
    is_truncated: bool = False
    caption_tokens: CaptionTokens | None = None
    geometry: Preprocessing | None = None

    @cached_property
    def norms(self) -> tuple[float, float]:
        """The Frobenius norm and the largest singular value of ``values`` (in float64), which every map error
        bound of a pair with this input needs: computed once per input, not once per pair."""
        import torch

        values = self.values.detach().double().cpu()
        return float(values.norm()), float(torch.linalg.matrix_norm(values, ord=2))

    @property
    def relative_completeness_error(self) -> float:
        """``completeness_error / difference_norm`` (0 for an input equal to its reference)."""
        return relative_error(self.completeness_error, self.difference_norm)


@dataclass(frozen=True)
class PairNumbers:
    """A pair's score and accuracy without its map (see :class:`InteractionMap` for the fields): what a run
    records of each pair when it does not store maps."""

    score: float
    terms: Tensor
    four_term_value: float
    completeness_error: float
    completeness_bound: float
    score_scale: float
    map_error_bound: float

    @property
    def relative_completeness_error(self) -> float:
        """``completeness_error / score_scale``; at most ``rel_a + rel_b + rel_a rel_b`` of the two inputs."""
        return relative_error(self.completeness_error, self.score_scale)


@dataclass(frozen=True)
class InteractionMap(PairNumbers):
    """Second-order attributions of one pair: how much each (row position, column position) interaction adds
    to the similarity.

    Attributes:
        interactions: ``(S_a, S_b)`` over every position of both inputs, prefix tokens included; its sum is
            ``four_term_value`` up to ``completeness_error``.
        score: the model's cosine similarity of the pair (times the logit scale if the map is scaled).
        terms: ``[cos(a,b), cos(r_a,b), cos(a,r_b), cos(r_a,r_b)]``.
        four_term_value: ``terms[0] - terms[1] - terms[2] + terms[3]``.
        completeness_error: ``|interactions.sum() - four_term_value|``.
        completeness_bound: the most ``completeness_error`` can be given the two inputs' own errors:
            ``|eps_a| |d_b| + |d_a| |eps_b| + |eps_a| |eps_b|`` (``d``: ``g(x) - g(r)``, ``eps``: an input's
            completeness residual), times the logit scale.
        score_scale: ``|d_a| |d_b|`` times the logit scale, the largest the four-term value can be; relative
            completeness errors of pairs are taken against it, so that pairs whose four-term value happens to
            be near zero do not read as inaccurate.
        map_error_bound: a bound on the relative (Frobenius) error of ``interactions``, from the two inputs'
            map error bounds (see :func:`xclip.attribution.engine.pair_map_error_bounds`); large where the map is small
            next to its inputs. NaN for fixed rules.
        row_labels, column_labels: position labels of the two inputs (tokens, patches).
        grid: ``(H, W)`` when the columns are an image's patches.
        n_prefix: leading column positions that are not patches (CLS).
        logit_scale: factor applied to interactions and terms (1.0 = plain cosine).
        caption_tokens: the rows as the caption's text, for :meth:`span` (caption-image maps).
        geometry: where the columns' patches lie in the original image, for :meth:`box`.
        caption_index, image_index: which of the ``captions`` and ``images`` given to
            :meth:`~xclip.InteractionAttribution.attribute` the map pairs (None for a map made otherwise).
        image: the image's file as given there (None for an image given as a picture).
        is_caption_truncated: the caption was longer than the model's context: the rows cover the tokens it read.
    """

    interactions: Tensor
    row_labels: list[str]
    column_labels: list[str]
    grid: tuple[int, int] | None = None
    n_prefix: int = 0
    logit_scale: float = 1.0
    caption_tokens: CaptionTokens | None = None
    geometry: Preprocessing | None = None
    caption_index: int | None = None
    image_index: int | None = None
    image: str | None = None
    is_caption_truncated: bool = False

    @property
    def caption(self) -> str | None:
        """The caption of a caption-image map, as given (None where the rows are not a caption's)."""
        return None if self.caption_tokens is None else self.caption_tokens.caption

    def span(self, span: str) -> Tensor:
        """``(H, W)``: the summed interactions of a caption span (words of the caption, or token indices
        ``"2:4"``) with every patch."""
        if self.caption_tokens is None or self.grid is None:
            msg = "span() needs a caption-image map (caption first, image second)"
            raise ValueError(msg)
        return self.patch_maps[self.caption_tokens.span_rows(span)].sum(0)

    def box(self, box: tuple[float, float, float, float]) -> Tensor:
        """``(S_t,)``: each caption position's interaction with the patches of a box in original-image pixels,
        each patch weighted by the share of its area inside the box (see :mod:`xclip.core.geometry`)."""
        if self.geometry is None:
            msg = "box() needs a caption-image map (caption first, image second)"
            raise ValueError(msg)
        import torch

        weights = torch.as_tensor(self.geometry.box_coverage(box), dtype=self.interactions.dtype, device=self.interactions.device)
        return self.interactions[:, self.n_prefix :] @ weights

    def plot(self, image: object, **options: object) -> object:
        """The figure ``xclip render`` draws of this map over ``image`` (a PIL image or its file): see
        :func:`xclip.show.figures.figure` for ``span``, ``box``, ``options`` and ``title``."""
        from xclip.show.figures import figure

        return figure(self, image, **options)  # type: ignore[arg-type]

    def save(self, path: str | Path) -> Path:
        """Write the map, its numbers, labels, tokens, geometry and identity (every field) to exactly ``path``, an
        ``.npz`` archive of plain arrays and JSON text (no pickled objects). No suffix is added: ``save("pair")``
        writes ``pair``, which :meth:`load` reads. The file is written under a temporary name in the same folder,
        then renamed, so that a failed write leaves an earlier file whole; missing folders are made.

        Raises:
            StoreError: the file cannot be written (naming it, and the disk when it is full).
        """
        import numpy as np

        from xclip.disk.files import write_atomically

        meta = {
            "numbers": {name: getattr(self, name) for name in _NUMBERS}, "row_labels": self.row_labels,
            "column_labels": self.column_labels, "grid": self.grid, "n_prefix": self.n_prefix,
            "logit_scale": self.logit_scale,
            "caption_tokens": None if self.caption_tokens is None else vars(self.caption_tokens),
            "geometry": None if self.geometry is None else self.geometry.to_row().tolist(),
            "caption_index": self.caption_index, "image_index": self.image_index, "image": self.image,
            "is_caption_truncated": self.is_caption_truncated,
        }
        arrays = {"interactions": self.interactions.detach().cpu().numpy(), "terms": self.terms.detach().cpu().numpy(),
                  "meta": np.array(json.dumps(meta))}

        def write(temporary: Path) -> None:
            # through an open file: given a path, numpy would write to the path with ".npz" appended
            with temporary.open("wb") as stream:
                np.savez(stream, **arrays)

        return write_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> InteractionMap:
        """The map :meth:`save` wrote to exactly ``path``, checked whole before use. A file saved before a field
        existed loads with that field's default (no identity, no map error bound: NaN).

        Raises:
            StoreError: the file cannot be read, is no map (not an ``.npz``, a part missing or pickled), or its
                parts disagree (an array's type or shape, labels, tokens or patch grid not matching the map's
                rows and columns); the message names the file and the fault.
        """
        import numpy as np
        import torch

        from xclip.core.geometry import Preprocessing
        from xclip.core.tokens import CaptionTokens

        path = Path(path)
        interactions, terms, meta = _read_archive(path)
        n_rows, n_columns = interactions.shape
        stored_numbers = _entry(meta, "numbers", path, lambda v: isinstance(v, dict), "a table of numbers")
        # map_error_bound: NaN, no bound, in maps saved before it existed
        numbers = {name: _entry(stored_numbers, name, path, _is_number, "a number", float("nan") if name == "map_error_bound" else _REQUIRED)
                   for name in _NUMBERS}
        row_labels = _entry(meta, "row_labels", path, _is_texts, "a list of texts")
        column_labels = _entry(meta, "column_labels", path, _is_texts, "a list of texts")
        grid = _entry(meta, "grid", path, _optional(_is_grid), "null or [rows, columns]")
        n_prefix = _entry(meta, "n_prefix", path, lambda v: _is_int(v) and 0 <= v <= n_columns, f"an integer from 0 to {n_columns}")
        tokens = _entry(meta, "caption_tokens", path, _optional(_is_caption_tokens), "null or a caption's tokens")
        geometry = _entry(meta, "geometry", path, _optional(_is_geometry_row), "null or 10 numbers")
        n_tokens = None if tokens is None else len(tokens["tokens"])
        faults = [fault for is_fault, fault in (
            (len(row_labels) != n_rows, f"{len(row_labels)} row labels for {n_rows} rows"),
            (len(column_labels) != n_columns, f"{len(column_labels)} column labels for {n_columns} columns"),
            (n_tokens is not None and n_tokens != n_rows, f"{n_tokens} caption tokens for {n_rows} rows"),
            (grid is not None and n_prefix + grid[0] * grid[1] != n_columns,
             f"{n_prefix} prefix columns and a patch grid of {grid} for {n_columns} columns"),
            (geometry is not None and geometry[8:] != grid, f"patch geometry of a {geometry and geometry[8:]} grid for a map of {grid}"),
        ) if is_fault]
        if faults:
            raise _unreadable(path, "; ".join(faults))
        return cls(
            **numbers, terms=torch.from_numpy(terms), interactions=torch.from_numpy(interactions), row_labels=row_labels,
            column_labels=column_labels, grid=None if grid is None else tuple(grid), n_prefix=n_prefix,
            logit_scale=_entry(meta, "logit_scale", path, _is_number, "a number"),
            caption_tokens=None if tokens is None else CaptionTokens(**{**tokens, "offsets": [tuple(o) for o in tokens["offsets"]]}),
            geometry=None if geometry is None else Preprocessing.from_row(np.array(geometry)),
            caption_index=_entry(meta, "caption_index", path, _optional(_is_index), "null or an index", None),
            image_index=_entry(meta, "image_index", path, _optional(_is_index), "null or an index", None),
            image=_entry(meta, "image", path, _optional(lambda v: isinstance(v, str)), "null or a text", None),
            is_caption_truncated=_entry(meta, "is_caption_truncated", path, lambda v: isinstance(v, bool), "true or false", False),
        )

    @property
    def patch_maps(self) -> Tensor:
        """``(S_t, H, W)``: each caption token's map over the image's patch grid (prefix columns dropped) for a
        caption-image pair, else ``interactions``."""
        if self.grid is None:
            return self.interactions
        return self.interactions[:, self.n_prefix :].reshape(self.interactions.shape[0], *self.grid)

    @property
    def prefix_interactions(self) -> Tensor:
        """``(S_t, n_prefix)``: interactions with the CLS/prefix positions left out of ``patch_maps``."""
        return self.interactions[:, : self.n_prefix]


# A pair map is marked inexact when its map error bound passes this many times the tolerance: two inputs within the
# tolerance give a map at most about twice it when the map is as large as its inputs allow, and the bound's
# worst-case alignment adds a few times more (on held-out demo pairs the true error was at most 0.36 of the bound,
# scripts/map_error_coverage.py); past ten times, the map's own smallness next to its inputs, not their accuracy,
# is what limits it.
INEXACT_PAIR_FACTOR = 10.0


def is_inexact_pair(map_error_bound: float, tolerance: float | None) -> bool:
    """Whether a pair map's error bound is too large for it to be read as exact (see :data:`INEXACT_PAIR_FACTOR`);
    never for a fixed rule (NaN: no bound) or without a tolerance."""
    return tolerance is not None and map_error_bound > INEXACT_PAIR_FACTOR * tolerance


def inexact_pair_note(map_error_bound: float) -> str:
    """What a figure, the viewer and explain say of an inexact pair map, with the reason and the remedy."""
    return (f"this map may be off by up to {map_error_bound:.1%} of its own size (map error bound {map_error_bound:.1e}): "
            "it is small next to its caption's and image's contributions, so their quadrature errors weigh more in it; "
            "attribute this caption and image with a tighter attribution.tolerance for an exact map")


def relative_error(error: float, scale: float) -> float:
    """``error / scale``, 0 where both are 0 (an input equal to its reference has nothing to get wrong)."""
    if scale > 0:
        return error / scale
    return 0.0 if error == 0 else float("inf")


# the scalar fields of a pair's numbers, saved as they are
_NUMBERS = ("score", "four_term_value", "completeness_error", "completeness_bound", "score_scale", "map_error_bound")


# --- reading a saved map: every part checked, every fault one StoreError naming the file ----------------------------
_ARRAYS = ("interactions", "terms", "meta")
_TOKEN_KEYS = {"caption", "tokens", "offsets", "special", "unknown"}
_REQUIRED = object()  # an entry every saved map has had, as opposed to one with a default for older files
# what a damaged or foreign file raises from inside numpy and zipfile, read or decompressed (an object array, which
# allow_pickle=False refuses, is a ValueError, an encrypted zip a RuntimeError, an unknown compression
# NotImplementedError); anything else is a bug and propagates
_ARCHIVE_FAULTS = (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def _unreadable(path: Path, fault: str) -> StoreError:
    return StoreError(f"cannot read the interaction map {path}: {fault}; the file is damaged, or InteractionMap.save did not write it")


def _read_archive(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A saved map's ``(S_a, S_b)`` interactions and ``(4,)`` terms, floats in native byte order (what torch
    takes), and its metadata."""
    import numpy as np

    if not path.is_file():
        msg = f"no interaction map at {path}: {'a folder' if path.is_dir() else 'no such file'}"
        raise StoreError(msg)
    try:
        with path.open("rb") as stream:
            head = stream.read(6)
        # np.load takes what is neither a zip nor an .npy for a pickle, and its refusal advises allow_pickle
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
            raise _unreadable(path, "an empty file" if not head else f"not an .npz archive (it starts with {head!r})")
        stored = np.load(path, allow_pickle=False)
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise _unreadable(path, "a single .npy array, not an .npz archive")
        with stored:
            missing = [name for name in _ARRAYS if name not in stored.files]
            if missing:
                raise _unreadable(path, f"it has {', '.join(stored.files) or 'no arrays'} but not {', '.join(missing)}")
            interactions, terms, meta = (stored[name] for name in _ARRAYS)
    except _ARCHIVE_FAULTS as e:
        raise _unreadable(path, f"{type(e).__name__}: {e}") from e
    for name, array, ndim in (("interactions", interactions, 2), ("terms", terms, 1)):
        if array.dtype.kind != "f" or array.dtype.itemsize > 8 or array.ndim != ndim:
            raise _unreadable(path, f"{name} is a {array.ndim}-D {array.dtype} array, not a {ndim}-D float one")
    if terms.shape != (4,):
        raise _unreadable(path, f"terms has shape {terms.shape}, not (4,)")
    if meta.dtype.kind != "U" or meta.ndim != 0:
        raise _unreadable(path, f"meta is a {meta.ndim}-D {meta.dtype} array, not JSON text")
    try:
        meta = json.loads(str(meta))
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the decoder follows
        raise _unreadable(path, f"meta is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise _unreadable(path, f"meta is JSON {type(meta).__name__}, not an object")
    native = [array.astype(array.dtype.newbyteorder("="), copy=False) for array in (interactions, terms)]
    return native[0], native[1], meta


def _entry(table: dict[str, Any], key: str, path: Path, is_valid: Callable[[Any], bool], expected: str,
           default: Any = _REQUIRED) -> Any:
    """``table[key]`` of a saved map's metadata if ``is_valid``; ``default`` where a file older than the entry
    lacks it."""
    if key not in table:
        if default is _REQUIRED:
            raise _unreadable(path, f"its metadata lacks {key}")
        return default
    value = table[key]
    if not is_valid(value):
        raise _unreadable(path, f"{key} is not {expected}: {json.dumps(value)[:200]}")
    return value


def _optional(is_valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or is_valid(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_grid(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)


def _is_geometry_row(value: Any) -> bool:
    """What :meth:`~xclip.core.geometry.Preprocessing.to_row` gives, as a list."""
    return isinstance(value, list) and len(value) == 10 and all(map(_is_number, value))


def _is_caption_tokens(value: Any) -> bool:
    """The fields of a :class:`~xclip.core.tokens.CaptionTokens`, one offset pair and two flags per token."""
    if not isinstance(value, dict) or set(value) != _TOKEN_KEYS or not isinstance(value["caption"], str) or not _is_texts(value["tokens"]):
        return False
    n_tokens = len(value["tokens"])
    flags = [value["special"], value["unknown"]]
    return (all(isinstance(f, list) and len(f) == n_tokens and all(isinstance(v, bool) for v in f) for f in flags)
            and isinstance(value["offsets"], list) and len(value["offsets"]) == n_tokens
            and all(isinstance(o, list) and len(o) == 2 and all(map(_is_index, o)) for o in value["offsets"]))
