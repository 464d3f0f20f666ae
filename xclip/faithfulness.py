"""Insertion and deletion curves: does a map's ranking say which inputs the model's score needs?

Players are a pair's caption tokens (not its special tokens) and image patches (not the class token). A
coalition keeps some players and replaces the others by the reference where the engine's path starts: their
hidden states entering the cut layer become the reference's. The game's value is the similarity of the two
embeddings: the full coalition scores ``cos(text, image)``; in the empty one only the special tokens and the
class token keep their states (as FIxLIP, which never removes them).

Insertion keeps the ``k`` players a map ranks highest, deletion removes them; each curve holds the game's
value minus the empty coalition's, and the **area between the curves** is the mean over ``k`` of insertion
minus deletion. It is large for a map that finds the few players the score rests on, 0 on average for a ranking
that knows nothing (the ``k`` of the grid are symmetric, so a random order's two curves average the same
coalition sizes) and negative for one that ranks backwards. This is the measure of FIxLIP (Baniecki et al.,
NeurIPS 2025: the area between deletion of the least and of the most important players first, which is the same
area). FIxLIP divides each pair's curves by ``v(full) - v(empty)``; where that change is small (a caption scored
barely above its reference) one pair's area explodes, so the areas are kept in score units here and a summary
divides their mean by the mean change (:func:`xclip.baseline_evaluation.summarize_methods`): 1 then means every
pair's score moved as fast as it can.

A first-order map ranks players by their values. A second-order map ranks coalitions as FIxLIP does for
interactions: the value it predicts for a coalition is the sum of the interactions among its players, and a
greedy search from every player grows, for each size, the coalition it predicts highest (kept by insertion)
and lowest (kept by deletion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xclip.attribution import CutStates
from xclip.core.transformer import embed_from_hidden

DEFAULT_POINTS = 20
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
        """Area between the curves, in score units: the mean of insertion minus deletion."""
        return float(np.mean(self.insertion - self.deletion))

    @property
    def change(self) -> float:
        """``v(full) - v(empty)``: what the curves run between."""
        return self.full - self.empty


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


def greedy_cliques(weights: np.ndarray, *, highest: bool) -> np.ndarray:
    """``(n + 1, n)``: for each size, the coalition whose summed pairwise ``weights`` (symmetric, zero diagonal)
    is highest (or lowest) among those a greedy search grows from every single player."""
    n = len(weights)
    signed = weights if highest else -weights
    members = np.eye(n, dtype=bool)  # one coalition grown from each player
    gains = signed.copy()  # gains[s, v]: what adding v adds to coalition s
    values = np.zeros(n)
    best = np.zeros((n + 1, n), dtype=bool)
    best[1] = members[0]
    starts = np.arange(n)
    for size in range(2, n + 1):
        open_gains = np.where(members, -np.inf, gains)
        pick = open_gains.argmax(1)
        values += open_gains[starts, pick]
        members[starts, pick] = True
        gains += signed[pick]
        best[size] = members[values.argmax()]
    return best


def interaction_coalitions(interactions: np.ndarray, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, n_rows + n_cols)`` players (rows first) kept by insertion and deletion for a second-order map
    ``(n_rows, n_cols)``: the greedy coalitions of size ``k`` predicted highest and of size ``n - k`` lowest."""
    n_rows, n_cols = interactions.shape
    n = n_rows + n_cols
    weights = np.zeros((n, n))
    weights[:n_rows, n_rows:] = interactions
    weights[n_rows:, :n_rows] = interactions.T
    return greedy_cliques(weights, highest=True)[moved], greedy_cliques(weights, highest=False)[n - moved]


def curves(game: Game, inserted: tuple[np.ndarray, np.ndarray], deleted: tuple[np.ndarray, np.ndarray], moved: np.ndarray) -> Curves:
    """Evaluate ``game`` on the coalitions kept by insertion and deletion (text and image players of each)."""
    n_text, n_image = inserted[0].shape[1], inserted[1].shape[1]
    ends_text = np.array([[True] * n_text, [False] * n_text])
    ends_image = np.array([[True] * n_image, [False] * n_image])
    values = game(np.concatenate([ends_text, inserted[0], deleted[0]]), np.concatenate([ends_image, inserted[1], deleted[1]]))
    full, empty, rest = values[0], values[1], values[2:] - values[1]
    return Curves(moved, rest[: len(moved)], rest[len(moved) :], float(full), float(empty))


class PairGame:
    """The game of one caption and one image at the cut layer, with every coalition's embedding cached (the
    image-only and caption-only curves of many maps share their other side's whole input).

    ``text`` and ``image`` hold one input each (batch of one); ``text_players`` and ``image_players`` are the
    positions that can be removed.
    """

    def __init__(self, text: CutStates, image: CutStates, text_players: np.ndarray, image_players: np.ndarray,
                 *, internal_batch_size: int = 64) -> None:
        self.text, self.image = text, image
        self.text_players, self.image_players = text_players, image_players
        self.internal_batch_size = internal_batch_size
        self._cache: dict[tuple[str, bytes], Tensor] = {}

    def __call__(self, text_kept: np.ndarray, image_kept: np.ndarray) -> np.ndarray:
        text = self._embeddings("text", self.text, self.text_players, text_kept)
        image = self._embeddings("image", self.image, self.image_players, image_kept)
        return (text * image).sum(-1).double().cpu().numpy()

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
