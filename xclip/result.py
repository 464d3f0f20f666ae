"""Result types: contribution vectors of one input and the interaction map of one pair."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor

    from xclip.geometry import Preprocessing
    from xclip.tokens import CaptionTokens

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
            map error bounds (see :func:`xclip.attribution.pair_map_error_bounds`); large where the map is small
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
        return self.interaction_map[self.caption_tokens.span_rows(span)].sum(0)

    def box(self, box: tuple[float, float, float, float]) -> Tensor:
        """``(S_t,)``: each caption position's interaction with the patches of a box in original-image pixels,
        each patch weighted by the share of its area inside the box (see :mod:`xclip.geometry`)."""
        if self.geometry is None:
            msg = "box() needs a caption-image map (caption first, image second)"
            raise ValueError(msg)
        import torch

        weights = torch.as_tensor(self.geometry.box_coverage(box), dtype=self.interactions.dtype, device=self.interactions.device)
        return self.interactions[:, self.n_prefix :] @ weights

    def plot(self, image: object, **options: object) -> object:
        """The figure ``xclip render`` draws of this map over ``image`` (a PIL image or its file): see
        :func:`xclip.render.figure` for ``span``, ``box``, ``options`` and ``title``."""
        from xclip.render import figure

        return figure(self, image, **options)  # type: ignore[arg-type]

    def save(self, path: str | Path) -> Path:
        """Write the map, its numbers, labels, tokens and geometry to an ``.npz`` file (no pickled objects)."""
        import numpy as np

        path = Path(path)
        meta = {
            "numbers": {name: getattr(self, name) for name in _NUMBERS}, "row_labels": self.row_labels,
            "column_labels": self.column_labels, "grid": self.grid, "n_prefix": self.n_prefix,
            "logit_scale": self.logit_scale,
            "caption_tokens": None if self.caption_tokens is None else vars(self.caption_tokens),
            "geometry": None if self.geometry is None else self.geometry.to_row().tolist(),
        }
        with path.open("wb") as stream:
            np.savez(stream, interactions=self.interactions.detach().cpu().numpy(), terms=self.terms.detach().cpu().numpy(),
                     meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> InteractionMap:
        """A map written by :meth:`save`."""
        import numpy as np
        import torch

        from xclip.geometry import Preprocessing
        from xclip.tokens import CaptionTokens

        with np.load(Path(path), allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            interactions, terms = torch.from_numpy(stored["interactions"]), torch.from_numpy(stored["terms"])
        tokens = meta["caption_tokens"]
        return cls(
            **meta["numbers"], terms=terms, interactions=interactions, row_labels=meta["row_labels"],
            column_labels=meta["column_labels"], grid=None if meta["grid"] is None else tuple(meta["grid"]),
            n_prefix=meta["n_prefix"], logit_scale=meta["logit_scale"],
            caption_tokens=None if tokens is None else CaptionTokens(
                **{**tokens, "offsets": [tuple(o) for o in tokens["offsets"]]}),
            geometry=None if meta["geometry"] is None else Preprocessing.from_row(np.array(meta["geometry"])),
        )


    @property
    def interaction_map(self) -> Tensor:
        """``(S_t, H, W)`` for a caption-image pair (prefix columns dropped), else ``interactions``."""
        if self.grid is None:
            return self.interactions
        return self.interactions[:, self.n_prefix :].reshape(self.interactions.shape[0], *self.grid)

    @property
    def prefix_interactions(self) -> Tensor:
        """``(S_t, n_prefix)``: interactions with the CLS/prefix positions left out of ``interaction_map``."""
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
