"""``xclip evaluate --baselines``: a run's second-order maps against first-order methods on the same pairs.

The run's model is loaded with the run's settings (:func:`xclip.attribution.from_config.load_attributor`), so every baseline
sees the same images, captions, reference and cut layer as the stored maps (:mod:`xclip.analysis.baselines`). Two
kinds of scores, each per method:

- **grounding** (with annotations): the phrase -> image pointing game, energy in box and mass ratio (FIxLIP's
  measure for its pointing game) of each phrase's map, as :mod:`xclip.analysis.grounding` scores them. The second-order
  map of a phrase sums its tokens' rows; a first-order method explains the image against the phrase encoded as
  a caption of its own (``target="phrase"``) or against the whole caption (``target="caption"``, one map for
  every phrase of the caption).
- **faithfulness** (any run): the area between insertion and deletion curves (:mod:`xclip.analysis.faithfulness`) of
  the whole caption and image, over the image's patches (``image``), the caption's tokens (``text``; methods
  with token values) and both together (``joint``), in the cut layer's game or FIxLIP's input game (``game``).
  The run's stored contributions rank players for the second-order explanations: ``second_order`` by the
  score's whole decomposition (first-order terms and interactions), ``second_order_interactions`` by the
  interaction map alone; first-order methods with token values rank all players by value in the joint game.

Differences to the second-order maps (``second_order``) are paired (the same phrase, the same pair) with
bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from xclip.models.base import ImageBatch
from xclip.attribution.engine import CutStates, InteractionAttribution
from xclip.analysis.baselines import DEFAULT_IG_STEPS, TOKEN_METHODS, check_methods, image_maps, text_embeddings, token_maps
from xclip.core.transformer import embed_from_hidden
from xclip.errors import ConfigError
from xclip.analysis.grounding import (
    METRICS,
    AnnotatedPair,
    annotated_pairs,
    box_weights,
    boxes_in_view,
    chance_levels,
    grounding_scores,
    phrase_class,
)
from xclip.analysis.faithfulness import (
    DEFAULT_POINTS,
    GAMES,
    GameName,
    JointTerms,
    PairDecomposition,
    PairGame,
    curves,
    input_states,
    interaction_terms,
    joint_coalitions,
    logit_bias,
    moved_counts,
    ranked_coalitions,
)
from xclip.analysis.summaries import interval_bars, interval_figure, mean_interval, paired_difference, save_chart
from xclip.store.layout import run_file_path
from xclip.store.reader import RunReader
from xclip.core.geometry import Preprocessing
from xclip.core.tokens import CaptionTokens

SECOND_ORDER = "second_order"
SECOND_ORDER_INTERACTIONS = "second_order_interactions"  # the interaction map alone, without first-order terms
CURVES = ("image", "text", "joint")
CHANGE = "change"  # a pair's v(full) - v(empty), stored beside its areas
Target = Literal["phrase", "caption"]


@dataclass
class MethodScores:
    """Per phrase (grounding) and per pair (faithfulness) scores of every method, in the run's pair order."""

    methods: tuple[str, ...]
    phrase_labels: list[str] = field(default_factory=list)
    phrase_values: list[dict[str, float]] = field(default_factory=list)  # "<method>/<metric>" -> score
    phrase_chance: list[dict[str, float]] = field(default_factory=list)  # "<metric>" -> chance level
    pair_areas: list[dict[str, float]] = field(default_factory=list)  # "<method>/<curve>" -> area between curves; CHANGE


def score_methods(
    run_dir: str | Path,
    methods: Sequence[str],
    *,
    annotations: str | Path | None = None,
    target: Target = "phrase",
    game: GameName = "cut",
    n_points: int = DEFAULT_POINTS,
    ig_steps: int = DEFAULT_IG_STEPS,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    attribution: InteractionAttribution | None = None,
) -> MethodScores:
    """Score the run's second-order maps and the first-order ``methods`` (names of
    :data:`xclip.analysis.baselines.FIRST_ORDER`, or ``["all"]``) on the run's finished pairs: with ``annotations``
    only the annotated ones, each phrase for grounding; else the first ``limit`` finished pairs.

    ``game`` is where insertion and deletion remove players and what they score: ``cut`` (the cut layer, the
    cosine) or ``input`` (FIxLIP's: the input embeddings, the logit); see :mod:`xclip.analysis.faithfulness`.
    ``attribution`` is the run's model with its settings (loaded from the run when None).
    """
    from xclip.attribution.from_config import load_attributor

    if target not in ("phrase", "caption"):
        msg = f"unknown baseline target {target!r}; choose phrase or caption"
        raise ConfigError(msg)
    if game not in GAMES:
        msg = f"unknown game {game!r}; choose {' or '.join(GAMES)}"
        raise ConfigError(msg)
    with RunReader(run_dir) as run:
        run.require_contributions("scoring first-order methods beside the run's maps (xclip evaluate --baselines)")
        pairs = annotated_pairs(run, annotations)
        if limit is not None:
            pairs = pairs[:limit]
        if not pairs:
            where = f"matches an annotation in {annotations}" if annotations else "is finished"
            msg = f"no pair of {run_file_path(run_dir)} {where}"
            raise ConfigError(msg)
        if attribution is None:
            attribution = load_attributor(run.settings)[0]
        names = check_methods(methods, attribution.model)
        scores = MethodScores(methods=(SECOND_ORDER, SECOND_ORDER_INTERACTIONS, *names))
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            _score_batch(run, attribution, batch, names, scores, target=target, game=game, n_points=n_points,
                         ig_steps=ig_steps, seed=seed, is_annotated=annotations is not None)
            if progress is not None:
                progress(min(start + batch_size, len(pairs)), len(pairs))
    return scores


def _score_batch(run: RunReader, attribution: InteractionAttribution, pairs: list[AnnotatedPair], names: tuple[str, ...],
                 scores: MethodScores, *, target: Target, game: GameName, n_points: int, ig_steps: int, seed: int, is_annotated: bool) -> None:
    model = attribution.model
    images = model.preprocess([run.image_picture(pair.image_index, owner=f" of pair {pair.index}") for pair in pairs])
    captions = model.tokenize([pair.caption for pair in pairs])
    text_cut, image_cut = attribution.text_cut(captions), attribution.image_cut(images)
    with torch.no_grad():  # the embeddings the games' full coalitions have: from the cut, not a second pass below it
        caption_embeddings, image_embeddings = (embed_from_hidden(cut.upper, cut.hidden, cut.positions, normalize=True)
                                                for cut in (text_cut, image_cut))
    if game == "input":
        text_game, image_game = input_states(attribution, captions, images)
        value_scale, value_bias = model.logit_scale, logit_bias(model)
    else:
        text_game, image_game, value_scale, value_bias = text_cut, image_cut, 1.0, 0.0
    pair_ids = [pair.index for pair in pairs]
    # whole-caption maps of every method: faithfulness, and grounding when the caption is the target
    patch_maps = {name: image_maps(attribution, name, caption_embeddings, images, pair_ids, ig_steps=ig_steps, seed=seed)
                  for name in names}
    caption_token_maps = {name: token_maps(attribution, name, captions, image_embeddings, pair_ids, ig_steps=ig_steps, seed=seed)
                          for name in names if name in TOKEN_METHODS}
    n_prefix = model.n_image_prefix
    for b, pair in enumerate(pairs):
        interactions = run.interactions(pair.index).astype(np.float64)
        tokens = run.caption_tokens(pair.caption_index)
        if len(tokens) != captions.n_positions[b]:
            msg = f"pair {pair.index}: the model now reads its caption as {captions.n_positions[b]} tokens, the run stored {len(tokens)}"
            raise ConfigError(msg)
        if is_annotated:
            phrase_maps = _phrase_maps(attribution, names, pair, images, b, interactions, tokens, target, patch_maps, seed)
            _add_grounding(scores, pair.phrases, phrase_maps, run.preprocessing(pair.image_index))
        text_players = np.flatnonzero(~np.array(tokens.special))
        image_players = np.arange(n_prefix, interactions.shape[1])
        pair_game = PairGame(_one(text_game, b), _one(image_game, b), text_players, image_players, logit_scale=value_scale,
                             logit_bias=value_bias, internal_batch_size=attribution.internal_batch_size)
        # the stored contributions, not the stored map: the map alone has no first-order terms
        decomposition = PairDecomposition.of(run.contributions("captions", pair.caption_index),
                                             run.contributions("images", pair.image_index))
        interaction_map = decomposition.interactions
        token_values = {name: values[b] for name, values in caption_token_maps.items()}
        token_values[SECOND_ORDER] = decomposition.text_values()
        token_values[SECOND_ORDER_INTERACTIONS] = interaction_map.sum(1)
        patch_values = {name: values[b] for name, values in patch_maps.items()}
        patch_values[SECOND_ORDER] = decomposition.image_values()[n_prefix:]
        patch_values[SECOND_ORDER_INTERACTIONS] = interaction_map[:, n_prefix:].sum(0)
        joint_terms = {SECOND_ORDER: decomposition.joint_terms(text_players, image_players),
                       SECOND_ORDER_INTERACTIONS: interaction_terms(interaction_map[np.ix_(text_players, image_players)])}
        scores.pair_areas.append(_areas(pair_game, scores.methods, patch_values, token_values, joint_terms, text_players,
                                        n_points))


def _add_grounding(scores: MethodScores, phrases: list[dict[str, Any]], phrase_maps: list[dict[str, np.ndarray] | None],
                   geometry: Preprocessing) -> None:
    """Every method's grounding scores of each phrase that has maps and a box the model saw (evaluate's own
    grounding lists the others)."""
    for phrase, maps in zip(phrases, phrase_maps):
        seen = boxes_in_view(phrase["boxes"], geometry).seen
        if maps is None or not seen:
            continue
        inside = box_weights(seen, geometry)
        scores.phrase_labels.append(phrase_class(phrase))
        scores.phrase_values.append({f"{name}/{metric}": value for name, values in maps.items()
                                     for metric, value in grounding_scores(values, inside).items()})
        scores.phrase_chance.append(chance_levels(inside))


def _one(cut: CutStates, b: int) -> CutStates:
    """The cut states of input ``b`` alone."""
    index = torch.tensor([b], device=cut.hidden.device)
    reference = cut.reference if cut.reference.shape[0] == 1 else cut.reference[index]
    return CutStates(cut.hidden[index], reference, cut.positions.select(index), cut.upper)


def _phrase_maps(attribution: InteractionAttribution, names: tuple[str, ...], pair: AnnotatedPair, images: ImageBatch, b: int,
                 interactions: np.ndarray, tokens: CaptionTokens, target: Target, patch_maps: dict[str, np.ndarray],
                 seed: int) -> list[dict[str, np.ndarray] | None]:
    """Per phrase of the pair, each method's patch map (None for a phrase no token overlaps)."""
    model = attribution.model
    n_prefix = model.n_image_prefix
    rows = [tokens.rows_overlapping(p["start"], p["end"]) for p in pair.phrases]
    scored = [i for i, r in enumerate(rows) if r]
    maps: list[dict[str, np.ndarray] | None] = [None] * len(pair.phrases)
    for i in scored:
        maps[i] = {SECOND_ORDER: interactions[rows[i]][:, n_prefix:].sum(0)}
    if not scored:
        return maps
    if target == "caption":
        for i in scored:
            maps[i].update({name: patch_maps[name][b] for name in names})  # type: ignore[union-attr]
        return maps
    phrase_targets = text_embeddings(model, [pair.phrases[i]["text"] for i in scored])
    repeated = ImageBatch(images.pixel_values[[b] * len(scored)], [images.geometry[b]] * len(scored), [images.images[b]] * len(scored))
    # the random control draws per phrase: its values must not repeat across a caption's phrases
    items = [pair.index * 1000 + i for i in scored]
    for name in names:
        values = image_maps(attribution, name, phrase_targets, repeated, items, seed=seed)
        for row, i in enumerate(scored):
            maps[i][name] = values[row]  # type: ignore[index]
    return maps


def _areas(game: PairGame, names: tuple[str, ...], patch_values: dict[str, np.ndarray], token_values: dict[str, np.ndarray],
           joint_terms: dict[str, JointTerms], text_players: np.ndarray, n_points: int) -> dict[str, float]:
    """Area between the curves of every method and game on one pair, and the pair's score change (:data:`CHANGE`).
    A method in ``joint_terms`` (a second-order one) ranks the joint game's coalitions by their predicted values,
    any other by its token and patch values."""
    n_text, n_image = len(text_players), len(game.image_players)
    moved_image, moved_text, moved_joint = (moved_counts(n, n_points) if n else np.zeros(0, dtype=int)
                                            for n in (n_image, n_text, n_text + n_image))
    whole_text = np.ones((len(moved_image), n_text), dtype=bool)
    whole_image = np.ones((len(moved_text), n_image), dtype=bool)
    areas: dict[str, float] = {}
    for name in names:
        inserted, deleted = ranked_coalitions(patch_values[name], moved_image)
        image_curves = curves(game, (whole_text, inserted), (whole_text, deleted), moved_image)
        areas[f"{name}/image"] = image_curves.area
        areas[CHANGE] = image_curves.change  # v(full) - v(empty): the same for every method
        if name not in token_values or n_text == 0:
            continue
        inserted, deleted = ranked_coalitions(token_values[name][text_players], moved_text)
        areas[f"{name}/text"] = curves(game, (inserted, whole_image), (deleted, whole_image), moved_text).area
        if name in joint_terms:
            inserted, deleted = joint_coalitions(joint_terms[name], moved_joint)
        else:
            inserted, deleted = ranked_coalitions(np.concatenate([token_values[name][text_players], patch_values[name]]), moved_joint)
        areas[f"{name}/joint"] = curves(game, (inserted[:, :n_text], inserted[:, n_text:]),
                                        (deleted[:, :n_text], deleted[:, n_text:]), moved_joint).area
    return areas


def summarize_methods(scores: MethodScores, *, seed: int = 0) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals of every method, and each baseline's paired difference from the
    second-order maps with its interval: grounding overall and per class, faithfulness overall (areas divided
    by the pairs' mean score change when it is positive)."""
    report: dict[str, Any] = {"methods": list(scores.methods), "n_phrases": len(scores.phrase_values),
                              "n_pairs": len(scores.pair_areas)}
    if scores.phrase_values:
        labels = np.array(scores.phrase_labels)
        groups = {"overall": np.ones(len(labels), dtype=bool), **{label: labels == label for label in sorted(set(labels))}}
        chance = {metric: float(np.mean([c[metric] for c in scores.phrase_chance])) for metric in METRICS}
        report["grounding"] = {
            group: {"n_phrases": int(members.sum()),
                    **_compare(scores.phrase_values, scores.methods, METRICS, members, seed)}
            for group, members in groups.items()
        }
        report["grounding_chance"] = chance
    # areas in units of the mean score change (see xclip.analysis.faithfulness): one scale for every method and pair, so
    # intervals and paired differences keep their meaning
    change = float(np.mean([row[CHANGE] for row in scores.pair_areas]))
    scale = change if change > 0 else 1.0
    scaled = [{key: value / scale for key, value in row.items()} for row in scores.pair_areas]
    report["faithfulness"] = _compare(scaled, scores.methods, CURVES, np.ones(len(scaled), dtype=bool), seed)
    report["faithfulness_scale"] = {"mean_score_change": change, "divided_by": scale}
    return report


def _compare(rows: list[dict[str, float]], methods: tuple[str, ...], metrics: tuple[str, ...], members: np.ndarray,
             seed: int) -> dict[str, Any]:
    """``{method: {metric: {mean, ci95, difference, difference_ci95, n}}}`` over the rows in ``members`` that
    have both the method's and the second-order value (a method without token values has no text or joint area;
    a method with no such value at all, such as the interactions-only ranking in grounding, is left out)."""
    chosen = [row for row, keep in zip(rows, members) if keep]
    out: dict[str, Any] = {}
    for method in methods:
        entry: dict[str, Any] = {}
        for metric in metrics:
            key, reference_key = f"{method}/{metric}", f"{SECOND_ORDER}/{metric}"
            paired = np.array([(row[key], row[reference_key]) for row in chosen if key in row and reference_key in row])
            if not len(paired):
                continue
            summary = mean_interval(paired[:, 0], seed=seed)
            entry[metric] = {"n": summary.n, "mean": summary.mean, "ci95": summary.ci95}
            if method != SECOND_ORDER:
                difference = paired_difference(paired[:, 0], paired[:, 1], seed=seed)
                entry[metric] |= {"difference": difference.mean, "difference_ci95": difference.ci95}
        if entry:
            out[method] = entry
    return out


def method_charts(report: dict[str, Any], folder: Path) -> list[Path]:
    """One bar chart per scored metric in ``folder``: each method's overall mean with its 95 % interval
    (``baselines_<metric>.png``; chance as a dotted line for the grounding metrics)."""
    panels = [("grounding", metric) for metric in METRICS if "grounding" in report]
    panels += [("faithfulness", curve) for curve in CURVES]
    paths = []
    for kind, metric in panels:
        entries = report["grounding"]["overall"] if kind == "grounding" else report["faithfulness"]
        methods = [m for m in report["methods"] if isinstance(entries.get(m), dict) and metric in entries[m]]
        if not methods:
            continue
        figure, axes = interval_figure(len(methods), 0.7)
        colours = [{SECOND_ORDER: "#b2182b", SECOND_ORDER_INTERACTIONS: "#ef8a62"}.get(m, "#878787") for m in methods]
        interval_bars(axes, np.arange(len(methods)), [entries[m][metric] for m in methods], capsize=4, color=colours)
        if kind == "grounding":
            axes.axhline(report["grounding_chance"][metric], color="#2166ac", linestyle=":", linewidth=2, label="chance")
            axes.legend(loc="upper right", frameon=False, fontsize="small")
        else:
            axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xticks(np.arange(len(methods)), [m.replace("_", " ") for m in methods], rotation=30, ha="right")
        axes.set_ylabel(metric.replace("_", " ") if kind == "grounding" else "area between the curves")
        axes.set_title("phrase → image grounding" if kind == "grounding" else f"insertion and deletion, {report.get('game', 'cut')} game: {metric} players",
                       fontsize="medium")
        paths.append(save_chart(figure, folder / f"baselines_{metric}.png"))
    return paths
