"""Insertion/deletion curves on planted games with known answers, the pair game against the engine's ends, and
``xclip evaluate --baselines`` end to end on planted maps."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from test_evaluation import _plant, _synthetic_run
from typer.testing import CliRunner

import xclip
from xclip.attribution import InteractionAttribution
from xclip.baseline_evaluation import SECOND_ORDER, _one
from xclip.cli import app
from xclip.faithfulness import (
    PairGame,
    curves,
    greedy_cliques,
    interaction_coalitions,
    moved_counts,
    ranked_coalitions,
)

runner = CliRunner()


def additive_game(weights: np.ndarray):
    """A game of image players only whose value is the sum of the kept players' weights."""
    return lambda text_kept, image_kept: image_kept.astype(float) @ weights


def image_only(kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((len(kept), 0), dtype=bool), kept


def test_moved_counts_are_symmetric_and_span_every_size_when_few():
    for n in range(1, 60):
        for points in (2, 5, 20):
            moved = moved_counts(n, points)
            assert moved[0] == 0 and moved[-1] == n
            assert set(moved) == set(n - moved)
    assert list(moved_counts(7, 20)) == list(range(8))


def test_additive_game_curves_equal_their_closed_form():
    weights = np.array([0.5, 3.0, -1.0, 2.0, 0.25, 1.0])
    moved = moved_counts(len(weights), 20)
    inserted, deleted = ranked_coalitions(weights, moved)
    result = curves(additive_game(weights), image_only(inserted), image_only(deleted), moved)
    top = np.concatenate([[0.0], np.cumsum(np.sort(weights)[::-1])])  # the k largest weights
    total = weights.sum()
    assert result.full == pytest.approx(total) and result.empty == 0.0
    np.testing.assert_allclose(result.insertion, top[moved])
    np.testing.assert_allclose(result.deletion, total - top[moved])
    assert result.area == pytest.approx(np.mean(2 * top[moved] - total))
    # the reversed ranking is the mirror image: the area changes sign
    inserted, deleted = ranked_coalitions(-weights, moved)
    assert curves(additive_game(weights), image_only(inserted), image_only(deleted), moved).area == pytest.approx(-result.area)


def test_a_ranking_that_knows_nothing_has_zero_area_on_average():
    """Averaged over every order of the players, insertion and deletion visit the same coalition sizes: the
    mean area is exactly zero, for any game."""
    rng = np.random.default_rng(0)
    n = 5
    values_of = {subset: rng.normal() for size in range(n + 1) for subset in itertools.combinations(range(n), size)}

    def game(text_kept, image_kept):
        return np.array([values_of[tuple(np.flatnonzero(row))] for row in image_kept])

    moved = moved_counts(n, 20)
    areas = []
    for order in itertools.permutations(range(n)):
        ranking = np.empty(n)
        ranking[list(order)] = np.arange(n, 0, -1)
        inserted, deleted = ranked_coalitions(ranking, moved)
        areas.append(curves(game, image_only(inserted), image_only(deleted), moved).area)
    assert abs(np.mean(areas)) < 1e-12
    assert np.std(areas) > 0.1  # single orders do differ


def brute_force_extremes(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per size, the highest and lowest summed pairwise weight of any coalition."""
    n = len(weights)
    highest, lowest = np.full(n + 1, -np.inf), np.full(n + 1, np.inf)
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            value = weights[np.ix_(subset, subset)].sum() / 2
            highest[size], lowest[size] = max(highest[size], value), min(lowest[size], value)
    return highest, lowest


def test_greedy_coalitions_of_a_planted_interaction_map_are_the_best_of_each_size():
    interactions = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, -1.0, 0.0]])  # token 0 binds patches 1 and 3
    n_rows, n_cols = interactions.shape
    weights = np.zeros((6, 6))
    weights[:n_rows, n_rows:], weights[n_rows:, :n_rows] = interactions, interactions.T
    highest, lowest = brute_force_extremes(weights)

    def surrogate(text_kept, image_kept):
        return np.einsum("kt,tp,kp->k", text_kept.astype(float), interactions, image_kept.astype(float))

    for cliques, best in ((greedy_cliques(weights, highest=True), highest), (greedy_cliques(weights, highest=False), lowest)):
        assert (cliques.sum(1) == np.arange(7)).all()
        values = [weights[np.ix_(c, c)].sum() / 2 for c in cliques]
        np.testing.assert_allclose(values, best)
    moved = moved_counts(6, 20)
    inserted, deleted = interaction_coalitions(interactions, moved)
    result = curves(surrogate, (inserted[:, :2], inserted[:, 2:]), (deleted[:, :2], deleted[:, 2:]), moved)
    np.testing.assert_allclose(result.insertion, highest[moved])
    np.testing.assert_allclose(result.deletion, lowest[6 - moved])
    assert inserted[2].tolist() == [True, False, False, True, False, False]  # the pair of largest interaction first


def test_the_pair_game_runs_between_the_engines_two_ends(model_dirs, images):
    model = xclip.load_model(model_dirs["clip"], dtype="float64", device="cpu")
    attribution = InteractionAttribution(model, n_steps=2, tolerance=None)
    captions = model.tokenize(["a red dog"])
    pictures = model.preprocess(images[:1])
    text = attribution.text_batch_contributions(captions)[0]
    image = attribution.image_batch_contributions(pictures)[0]
    text_players = np.flatnonzero(~np.array(captions.tokens[0].special))
    image_players = np.arange(model.n_image_prefix, image.values.shape[0])
    game = PairGame(_one(attribution.text_cut(captions), 0), _one(attribution.image_cut(pictures), 0), text_players, image_players)
    everything = (np.ones((1, len(text_players)), bool), np.ones((1, len(image_players)), bool))
    nothing = (np.zeros((1, len(text_players)), bool), np.zeros((1, len(image_players)), bool))
    assert game(*everything)[0] == pytest.approx(float(text.embedding @ image.embedding), abs=1e-12)
    # with no player left, the special tokens and the class token keep their own states
    text_cut, image_cut = attribution.text_cut(captions), attribution.image_cut(pictures)
    bare_text, bare_image = text_cut.hidden.clone(), image_cut.hidden.clone()
    bare_text[0, text_players] = text_cut.reference[0, text_players]
    bare_image[0, image_players] = image_cut.reference[0, image_players]
    ends = [xclip.core.transformer.embed_from_hidden(cut.upper, hidden, cut.positions, normalize=True)[0]
            for cut, hidden in ((text_cut, bare_text), (image_cut, bare_image))]
    assert game(*nothing)[0] == pytest.approx(float((ends[0] @ ends[1]).detach()), abs=1e-12)
    # removing one patch changes the image side only: the same as embedding the edited hidden states
    one_patch = (everything[0], np.eye(1, len(image_players), 5, dtype=bool) ^ True)
    cut = attribution.image_cut(pictures)
    edited = cut.hidden.clone()
    edited[0, image_players[5]] = cut.reference[0, image_players[5]]
    embedding = xclip.core.transformer.embed_from_hidden(cut.upper, edited, cut.positions, normalize=True)[0]
    assert game(*one_patch)[0] == pytest.approx(float(text.embedding @ embedding.detach()), abs=1e-12)


def test_evaluate_baselines_pairs_each_method_with_the_planted_maps(tmp_path, model_dirs):
    run_file, annotations = _synthetic_run(tmp_path, model_dirs)
    _plant(run_file, annotations, model_dirs, correct=True)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(tmp_path / "scenes" / "annotations.jsonl"),
                                 "--baselines", "random,integrated_gradients,centre", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "baselines.json").read_text())
    assert report["methods"] == [SECOND_ORDER, "random", "integrated_gradients", "centre"]
    overall = report["grounding"]["overall"]
    assert overall["n_phrases"] == sum(len(r["phrases"]) for r in annotations)
    assert overall[SECOND_ORDER]["pointing_game"]["mean"] == 1.0  # the planted maps point inside every box
    for method in ("random", "integrated_gradients", "centre"):
        game = overall[method]["pointing_game"]
        assert game["difference"] == pytest.approx(game["mean"] - 1.0)
        assert game["difference_ci95"][1] <= 1e-12  # no phrase can beat a planted hit
    faithfulness = report["faithfulness"]
    assert set(faithfulness["integrated_gradients"]) == {"image", "text", "joint"}
    assert set(faithfulness["centre"]) == {"image"}  # a control with no token values
    assert faithfulness[SECOND_ORDER]["image"]["n"] == len(annotations)
    assert "insertion/deletion" in result.output and "second_order" in result.output
    assert (tmp_path / "run" / "evaluation" / "baselines_pointing_game.png").is_file()


def test_evaluate_baselines_without_annotations_scores_faithfulness_only(tmp_path, model_dirs):
    _synthetic_run(tmp_path, model_dirs)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--baselines", "gradient_input", "--limit", "2", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "baselines.json").read_text())
    assert "grounding" not in report and report["n_pairs"] == 2
    assert not (tmp_path / "run" / "evaluation" / "report.json").exists()


def test_evaluate_needs_annotations_or_baselines_and_refuses_unknown_methods(tmp_path, model_dirs):
    _synthetic_run(tmp_path, model_dirs)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--baselines", "lime"])
    assert result.exit_code == 2 and "unknown baseline 'lime'" in result.output


@pytest.mark.parametrize("target", ["phrase", "caption"])
def test_a_first_order_method_explains_the_image_against_the_phrase_or_the_whole_caption(tmp_path, model_dirs, target):
    from xclip.baseline_evaluation import _phrase_maps
    from xclip.baselines import image_maps, text_embeddings
    from xclip.evaluation import annotated_pairs
    from xclip.runner import load_attributor
    from xclip.store import RunReader

    _synthetic_run(tmp_path, model_dirs)
    with RunReader(tmp_path / "run") as run:
        pair = next(p for p in annotated_pairs(run, tmp_path / "scenes" / "annotations.jsonl") if len(p.phrases) >= 2)
        attribution = load_attributor(run.settings)[0]
        model = attribution.model
        images = model.preprocess([run.image_source(pair.image_index)])
        caption_maps = {"integrated_gradients": image_maps(attribution, "integrated_gradients",
                                                            text_embeddings(model, [pair.caption]), images, [pair.index])}
        tokens = run.caption_tokens(pair.caption_index)
        interactions = run.interactions(pair.index).astype(np.float64)
        maps = _phrase_maps(attribution, ("integrated_gradients",), pair, images, 0, interactions, tokens, target, caption_maps, 0)
    for phrase, phrase_maps in zip(pair.phrases, maps):
        rows = tokens.rows_overlapping(phrase["start"], phrase["end"])
        np.testing.assert_allclose(phrase_maps[SECOND_ORDER], interactions[rows][:, model.n_image_prefix:].sum(0))
        if target == "caption":  # one map for every phrase of the caption
            np.testing.assert_array_equal(phrase_maps["integrated_gradients"], caption_maps["integrated_gradients"][0])
        else:  # the phrase alone, encoded as a caption
            expected = image_maps(attribution, "integrated_gradients", text_embeddings(model, [phrase["text"]]), images, [0])[0]
            np.testing.assert_allclose(phrase_maps["integrated_gradients"], expected, rtol=1e-6, atol=1e-9)
            assert not np.allclose(expected, caption_maps["integrated_gradients"][0])
