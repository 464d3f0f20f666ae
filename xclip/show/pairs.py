"""One pair as its figures see it (:class:`PairView`): its caption's tokens, its map, where the map's patches
lie in its image, its numbers; read from a run file (:func:`load_pair_view`) or made of an API result
(:func:`pair_view`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xclip.attribution.result import InteractionMap
from xclip.core.geometry import Preprocessing
from xclip.core.quadrature import DEFAULT_TOLERANCE
from xclip.core.tokens import CaptionTokens
from xclip.errors import ConfigError
from xclip.models.base import read_image
from xclip.store.directory import pair_stem, slug
from xclip.store.reader import RunReader

SEEN_WHOLE = 0.999  # a crop that keeps more of the image than this cut nothing worth drawing


@dataclass(frozen=True)
class PairView:
    """What a figure of one pair needs: from a run file (:func:`load_pair_view`) or an API result
    (:func:`pair_view`)."""

    title: str  # "pair 12", or what the caller names it
    name: str  # the start of the figures' file names: "pair000012"
    tokens: CaptionTokens  # the rows: the caption's positions as its text
    interactions: np.ndarray  # (n_tokens, n_image_positions), prefix (CLS) columns first
    geometry: Preprocessing  # where the columns' patches lie in the original image
    n_prefix: int
    image: Image.Image  # the model's view: the original's crop box resized to the input size
    score: float
    four_term_value: float
    completeness_error: float
    original: Image.Image | None = None  # the image as read, for the image panel to show what a crop cut off
    map_error_bound: float = math.nan  # relative to the map's own size (NaN: a fixed rule, no bound)
    tolerance: float | None = None  # the run's; a map whose bound passes it far is noted (result.is_inexact_pair)
    is_truncated: bool = False  # the caption was cut to the model's context: the figure marks the cut

    @property
    def caption(self) -> str:
        return self.tokens.caption

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    def patch_map(self, token_rows: Sequence[int]) -> np.ndarray:
        """``(H, W)``: the summed interactions of the given caption positions with every patch."""
        summed = self.interactions[list(token_rows)].sum(0)[self.n_prefix :]
        return summed.reshape(self.grid)

    def word_totals(self, patch_weights: np.ndarray | None = None) -> list[tuple[str, list[int], float]]:
        """Each caption word, its token rows, and its total interaction with the image (every position, CLS
        included, so the totals and the special tokens' add up to the score) or with the patches weighted by
        ``patch_weights`` (a box's coverage)."""
        if patch_weights is None:
            row_totals = self.interactions.sum(1)
        else:
            row_totals = self.interactions[:, self.n_prefix :] @ patch_weights
        return [(word.text, word.rows, float(row_totals[word.rows].sum())) for word in self.tokens.words()]


def pair_view(result: InteractionMap, image: Image.Image | str | Path, *, title: str = "pair",
              tolerance: float | None = DEFAULT_TOLERANCE, name: str | None = None,
              keep_whole_original: bool = True) -> PairView:
    """A :class:`PairView` of a pair map: ``result`` from :func:`xclip.interaction_map` of a caption and an image,
    or a stored pair (:meth:`RunReader.pair`), and ``image`` (the picture, or its file); ``tolerance``, the
    attribution's, for the inexact-map note; ``name`` the figures' file names (default: the title's words).
    ``keep_whole_original=False`` drops the original where the crop cut nothing worth drawing (a run's renderer
    holds every view at once)."""
    if result.geometry is None or result.caption_tokens is None:
        msg = "the result's rows and columns are not a caption's tokens and an image's patches: draw caption-image maps (caption first, image second)"
        raise ConfigError(msg)
    picture = read_image(Path(image))[0] if isinstance(image, (str, Path)) else image
    is_original_kept = keep_whole_original or result.geometry.seen_share < SEEN_WHOLE
    return PairView(
        title=title, name=name or slug(title), tokens=result.caption_tokens,
        interactions=result.interactions.detach().double().cpu().numpy(), geometry=result.geometry,
        n_prefix=result.n_prefix, image=result.geometry.model_view(picture), score=result.score,
        four_term_value=result.four_term_value, completeness_error=result.completeness_error,
        original=picture if is_original_kept else None,
        map_error_bound=result.map_error_bound, tolerance=tolerance, is_truncated=result.is_caption_truncated,
    )


def load_pair_view(run: RunReader, index: int, data_root: Path) -> PairView:
    """A stored pair's :class:`PairView`: the pair as :meth:`RunReader.pair` reads it, its image from
    ``data_root`` (checked as :meth:`RunReader.image_source` checks it)."""
    pair = run.pair(index)
    picture = run.image_picture(pair.image_index, data_root, owner=f" of pair {index}")
    return pair_view(pair, picture, title=f"pair {index}", name=pair_stem(index),
                     tolerance=run.settings.attribution.tolerance, keep_whole_original=False)
