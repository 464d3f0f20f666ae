"""Insertion and deletion curves: does a map's ranking say which inputs the model's score needs?

Players are a pair's caption tokens (not its special tokens) and image patches (not the class token). A
coalition keeps some players and replaces the others by the reference; the special tokens and the class token
are never removed (as in FIxLIP). Two games (:data:`GAMES`) say where a player is removed and what is scored:

- ``cut`` (the default): at the cut layer, where the engine's path starts: a removed player's hidden states
  entering the cut layer become the reference's. The value is the cosine of the two embeddings, the score the
  maps decompose. The special tokens and the class token keep their own states at the cut, which have read the
  whole caption or image in the blocks below: the empty coalition is not the reference pair.
- ``input``: FIxLIP's game (Baniecki et al., NeurIPS 2025). Removed at the input embeddings (the token and
  patch embeddings after the embedding layer: the states entering block 0), replaced by the reference's there
  (the caption's reference is BOS, filler, EOS; the image's is the run's reference image); the value is the
  model's logit, ``logit_scale * cos`` plus SigLIP's bias. Every coalition runs the whole towers. The special
  tokens' and the class token's input embeddings are the reference's own, so the empty coalition is the
  reference pair.

Insertion keeps the ``k`` players a map ranks highest, deletion removes them; each curve holds the game's
value minus the empty coalition's, and the **area between the curves** is the mean over ``k`` of insertion
minus deletion. It is large for a map that finds the few players the score rests on, 0 on average for a ranking
that knows nothing (the ``k`` of the grid are symmetric, so a random order's two curves average the same
coalition sizes) and negative for one that ranks backwards. This is the measure of FIxLIP (the area between
deletion of the least and of the most important players first, which is the same area). FIxLIP divides each
pair's curves by ``v(full) - v(empty)``; where that change is small (a caption scored barely above its
reference) one pair's area explodes, so the areas are kept in the game's units here and a summary divides their
mean by the mean change (:func:`xclip.analysis.baseline_evaluation.summarize_methods`). That can pass 1: insertion may
rise above the full coalition's value and deletion fall below the empty one's.

A first-order map ranks players by their values. A second-order explanation ranks them by the whole
decomposition of the score that its contribution vectors give (:class:`PairDecomposition`; ``C_a[i]`` and
``C_b[j]`` the contributions of caption position ``i`` and image position ``j`` at the cut, ``e_ra`` and
``e_rb`` the references' normalised embeddings)::

    s(a,b) = s(r_a,r_b) + sum_j e_ra . C_b[j] + sum_i C_a[i] . e_rb + sum_ij C_a[i] . C_b[j]

that is, each side's embedding predicted as its reference's plus the contributions of the positions it keeps,
``ê_a(T) = e_ra + sum_{i in T} C_a[i]``, and the score as their product ``ê_a . ê_b``. The image game keeps the
caption whole, so patch ``j`` is worth ``ê_a . C_b[j] = e_ra . C_b[j] + sum_i C_a[i] . C_b[j]`` (every caption
position ``i``): the patch values of integrated gradients of the similarity with the caption on the same cut,
the same first-order quantity. The text game ranks token ``i`` by ``C_a[i] . e_rb + sum_j C_a[i] . C_b[j]``.
In the joint game, with ``K_a`` and ``K_b`` the positions no coalition removes (special tokens, class token),
a coalition of tokens ``T`` and patches ``P`` is predicted (:class:`JointTerms`), relative to the empty one,

    v̂(T, P) - v̂(∅, ∅) = sum_{j in P} ê_a(K_a) . C_b[j] + sum_{i in T} C_a[i] . ê_b(K_b) + sum_{i in T, j in P} C_a[i] . C_b[j]

exactly, for ``v̂(T, P) = ê_a(T + K_a) . ê_b(P + K_b)``. The first-order terms are taken against the empty
coalition's predicted embeddings, ``ê_a(K_a) = e_ra + sum_{i in K_a} C_a[i]``: the references' embeddings
alone would leave out what the always-kept positions contribute (CLIP's EOS, where the caption is read, above
all). ``v̂`` of the full coalition is ``s(a,b)`` up to the completeness error; of the empty one it is the
surrogate's, not the game's (the game is not additive). FIxLIP's greedy search from every player grows, for
each size, the coalition predicted highest (kept by insertion) and lowest (kept by deletion).

The interactions-only ranking (:func:`interaction_terms`) is the interaction map alone: its column and row sums
in the image and text games, the interactions among a coalition's players in the joint game. It leaves out the
first-order terms and answers another question (which tokens and patches go together, not what the score rests
on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from xclip.models.base import DualEncoderAdapter, ImageBatch, TextBatch
from xclip.attribution.engine import CutStates, InteractionAttribution
from xclip.core.transformer import Positions, embed_from_hidden
from xclip.attribution.result import Contributions

DEFAULT_POINTS = 20
GameName = Literal["cut", "input"]
GAMES: tuple[str, ...] = get_args(GameName)
Game = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (K, text players), (K, image players) kept -> (K,) values


@dataclass(frozen=True)
class Curves:
    """Insertion and deletion curves of one map on one pair.

    Attributes:
        moved: ``(K,)`` players inserted (insertion) or removed (deletion) at each point.
        insertion, deletion: ``(K,)`` the game's values there minus the empty coalition's.
        full, empty: the game's values with every player and with none.
    """

    moved: np.ndarray
    insertion: np.ndarray
    deletion: np.ndarray
    full: float
    empty: float

    @property
    def area(self) -> float:
        """Area between the curves, in the game's units: the mean of insertion minus deletion."""
        return float(np.mean(self.insertion - self.deletion))

    @property
    def change(self) -> float:
        """``v(full) - v(empty)``: what the curves run between."""
        return self.full - self.empty


@dataclass(frozen=True)
class JointTerms:
    """What a ranking predicts for the joint game's coalitions, relative to the empty one: a coalition of text
    players ``T`` and image players ``P`` is worth ``sum_{i in T} text[i] + sum_{j in P} image[j] +
    sum_{i in T, j in P} interactions[i, j]``.

    Attributes:
        text: ``(n_text,)`` first-order terms of the text players.
        image: ``(n_image,)`` first-order terms of the image players.
        interactions: ``(n_text, n_image)`` between text and image players.
    """

    text: np.ndarray
    image: np.ndarray
    interactions: np.ndarray

    def predicted(self, text_kept: np.ndarray, image_kept: np.ndarray) -> np.ndarray:
        """``(K,)`` predicted values of coalitions keeping ``text_kept`` ``(K, n_text)`` and ``image_kept``
        ``(K, n_image)``, relative to the empty coalition."""
        text, image = text_kept.astype(float), image_kept.astype(float)
        return text @ self.text + image @ self.image + np.einsum("kt,tp,kp->k", text, self.interactions, image)


@dataclass(frozen=True)
class PairDecomposition:
    """A pair's score split by its two inputs' contributions at the cut (see the module's docstring).

    Attributes:
        text: ``(S_a, E)`` contribution vectors of the caption's positions.
        image: ``(S_b, E)`` contribution vectors of the image's positions (prefix first).
        text_reference, image_reference: ``(E,)`` the references' normalised embeddings.
    """

    text: np.ndarray
    image: np.ndarray
    text_reference: np.ndarray
    image_reference: np.ndarray

    @classmethod
    def of(cls, text: Contributions, image: Contributions) -> PairDecomposition:
        """The decomposition of a caption's and an image's contributions, as the engine gave them (float64)."""
        def array(tensor: Tensor) -> np.ndarray:
            return tensor.detach().double().cpu().numpy()

        return cls(array(text.values), array(image.values), array(text.reference_embedding), array(image.reference_embedding))

    @property
    def interactions(self) -> np.ndarray:
        """``(S_a, S_b)``: ``C_a[i] . C_b[j]``, the interaction map."""
        return self.text @ self.image.T

    def image_values(self) -> np.ndarray:
        """``(S_b,)`` what each image position adds with the caption whole: ``ê_a . C_b[j]``."""
        return (self.text_reference + self.text.sum(0)) @ self.image.T

    def text_values(self) -> np.ndarray:
        """``(S_a,)`` what each caption position adds with the image whole: ``C_a[i] . ê_b``."""
        return self.text @ (self.image_reference + self.image.sum(0))

    def joint_terms(self, text_players: np.ndarray, image_players: np.ndarray) -> JointTerms:
        """The joint game's predicted values of coalitions of ``text_players`` and ``image_players``
        (positions); every other position is kept in every coalition."""
        text_kept = np.ones(len(self.text), dtype=bool)
        text_kept[text_players] = False
        image_kept = np.ones(len(self.image), dtype=bool)
        image_kept[image_players] = False
        empty_text = self.text_reference + self.text[text_kept].sum(0)  # ê_a(K_a)
        empty_image = self.image_reference + self.image[image_kept].sum(0)  # ê_b(K_b)
        return JointTerms(self.text[text_players] @ empty_image, self.image[image_players] @ empty_text,
                          self.text[text_players] @ self.image[image_players].T)


def interaction_terms(interactions: np.ndarray) -> JointTerms:
    """The interactions-only ranking of the joint game: a coalition is worth the interactions among its players."""
    n_text, n_image = interactions.shape
    return JointTerms(np.zeros(n_text), np.zeros(n_image), interactions)


def moved_counts(n_players: int, n_points: int = DEFAULT_POINTS) -> np.ndarray:
    """At most ``n_points + 1`` counts from 0 to ``n_players``, symmetric (``k`` in it iff ``n - k`` is)."""
    if n_players < 1:
        msg = "a curve needs at least one player"
        raise ValueError(msg)
    steps = np.floor(n_players * np.arange(n_points // 2 + 1) / max(n_points, 1)).astype(int)
    return np.unique(np.concatenate([steps, n_players - steps]))


def ranked_coalitions(values: np.ndarray, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, n)`` players kept by insertion (the ``k`` highest values) and by deletion (all but those); ties
    are broken by position, the same way in both."""
    rank = np.empty(len(values), dtype=int)
    rank[np.argsort(-np.asarray(values), kind="stable")] = np.arange(len(values))
    inserted = rank[None, :] < moved[:, None]
    return inserted, ~inserted


def greedy_coalitions(first_order: np.ndarray, weights: np.ndarray, *, highest: bool) -> np.ndarray:
    """``(n + 1, n)``: for each size, the coalition whose predicted value (its players' ``first_order`` values
    plus their summed pairwise ``weights``, symmetric with a zero diagonal) is highest (or lowest) among those a
    greedy search grows from every single player."""
    n = len(weights)
    sign = 1.0 if highest else -1.0
    signed_first, signed = sign * np.asarray(first_order, dtype=float), sign * weights
    members = np.eye(n, dtype=bool)  # one coalition grown from each player
    gains = signed_first[None, :] + signed  # gains[s, v]: what adding v adds to coalition s
    values = signed_first.copy()
    best = np.zeros((n + 1, n), dtype=bool)
    best[1] = members[values.argmax()]
    starts = np.arange(n)
    for size in range(2, n + 1):
        open_gains = np.where(members, -np.inf, gains)
        pick = open_gains.argmax(1)
        values += open_gains[starts, pick]
        members[starts, pick] = True
        gains += signed[pick]
        best[size] = members[values.argmax()]
    return best


def joint_coalitions(terms: JointTerms, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, n_text + n_image)`` players (text first) kept by insertion and deletion in the joint game: the
    greedy coalitions of size ``k`` predicted highest and of size ``n - k`` predicted lowest."""
    n_text, n_image = terms.interactions.shape
    n = n_text + n_image
    weights = np.zeros((n, n))
    weights[:n_text, n_text:] = terms.interactions
    weights[n_text:, :n_text] = terms.interactions.T
    first_order = np.concatenate([terms.text, terms.image])
    return (greedy_coalitions(first_order, weights, highest=True)[moved],
            greedy_coalitions(first_order, weights, highest=False)[n - moved])


def curves(game: Game, inserted: tuple[np.ndarray, np.ndarray], deleted: tuple[np.ndarray, np.ndarray], moved: np.ndarray) -> Curves:
    """Evaluate ``game`` on the coalitions kept by insertion and deletion (text and image players of each)."""
    n_text, n_image = inserted[0].shape[1], inserted[1].shape[1]
    ends_text = np.array([[True] * n_text, [False] * n_text])
    ends_image = np.array([[True] * n_image, [False] * n_image])
    values = game(np.concatenate([ends_text, inserted[0], deleted[0]]), np.concatenate([ends_image, inserted[1], deleted[1]]))
    full, empty, rest = values[0], values[1], values[2:] - values[1]
    return Curves(moved, rest[: len(moved)], rest[len(moved) :], float(full), float(empty))


def input_states(attribution: InteractionAttribution, captions: TextBatch, images: ImageBatch) -> tuple[CutStates, CutStates]:
    """The input game's two sides: the captions' and images' states entering block 0 (the embedding layer's
    output), their references' there (BOS, filler, EOS; the attribution's reference image) and the whole towers
    above them, in the dtype the cut game runs in (float32 for a low-precision model)."""
    model = attribution.model
    dtype = torch.float32 if model.dtype in (torch.bfloat16, torch.float16) else model.dtype
    reference_ids = model.text_reference_ids(captions, attribution.text_filler)
    mask = captions.positions.mask
    both = Positions(mask=None if mask is None else torch.cat([mask, mask]))
    text, text_reference = model.text_hidden(torch.cat([captions.input_ids, reference_ids]), both, 0).chunk(2)
    reference_pixels = model.image_reference_pixels(images, attribution.image_reference, seed=attribution.reference_seed,
                                                    blur_radius=attribution.blur_radius)
    image, image_reference = model.image_hidden(images.pixel_values, 0), model.image_hidden(reference_pixels, 0)
    image_positions = Positions(pooled_index=model.image_pooled_index(image.shape[0]))
    text_upper, image_upper = model.text_upper(0), model.image_upper(0)
    if dtype != model.dtype:
        text_upper, image_upper = text_upper.to(dtype), image_upper.to(dtype)
    return (CutStates(text.to(dtype), text_reference.to(dtype), captions.positions, text_upper),
            CutStates(image.to(dtype), image_reference.to(dtype), image_positions, image_upper))


def logit_bias(model: DualEncoderAdapter) -> float:
    """The bias the model adds to its logits (SigLIP's), 0 for a model without one."""
    bias = getattr(model.model, "logit_bias", None)
    return 0.0 if bias is None else float(bias.detach())


class PairGame:
    """The game of one caption and one image, with every coalition's embedding cached (the image-only and
    caption-only curves of many maps share their other side's whole input).

    ``text`` and ``image`` hold one input each (batch of one) where players are removed (the cut layer's
    states, or :func:`input_states`); ``text_players`` and ``image_players`` are the positions that can be
    removed. The value is ``logit_scale * cos + logit_bias`` of the two embeddings (the cosine by default).
    """

    def __init__(self, text: CutStates, image: CutStates, text_players: np.ndarray, image_players: np.ndarray,
                 *, logit_scale: float = 1.0, logit_bias: float = 0.0, internal_batch_size: int = 64) -> None:
        self.text, self.image = text, image
        self.text_players, self.image_players = text_players, image_players
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.internal_batch_size = internal_batch_size
        self._cache: dict[tuple[str, bytes], Tensor] = {}

    def __call__(self, text_kept: np.ndarray, image_kept: np.ndarray) -> np.ndarray:
        text = self._embeddings("text", self.text, self.text_players, text_kept)
        image = self._embeddings("image", self.image, self.image_players, image_kept)
        return self.logit_scale * (text * image).sum(-1).double().cpu().numpy() + self.logit_bias

    def _embeddings(self, side: str, cut: CutStates, players: np.ndarray, kept: np.ndarray) -> Tensor:
        keys = [(side, row.tobytes()) for row in np.packbits(kept, axis=1)]
        missing = list(dict.fromkeys(key for key in keys if key not in self._cache))
        if missing:
            rows = {key: i for i, key in enumerate(keys)}
            masks = torch.ones((len(missing), cut.hidden.shape[1]), dtype=torch.bool, device=cut.hidden.device)
            masks[:, torch.as_tensor(players, device=masks.device)] = torch.as_tensor(
                kept[[rows[key] for key in missing]], device=masks.device
            )
            for chunk in range(0, len(missing), self.internal_batch_size):
                mask = masks[chunk : chunk + self.internal_batch_size]
                hidden = torch.where(mask[:, :, None], cut.hidden, cut.reference[:1].expand_as(cut.hidden))
                positions = cut.positions.select(torch.zeros(len(mask), dtype=torch.long, device=mask.device))
                with torch.no_grad():
                    embedded = embed_from_hidden(cut.upper, hidden, positions, normalize=True)
                for key, embedding in zip(missing[chunk : chunk + self.internal_batch_size], embedded):
                    self._cache[key] = embedding
        return torch.stack([self._cache[key] for key in keys])
