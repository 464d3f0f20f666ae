"""Insertion/deletion curves on planted games with known answers, the second-order rankings against their
formulas and against integrated gradients, both games against the model's own ends, and ``xclip evaluate
--baselines`` end to end on planted maps."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import plant_phrase_maps, synthetic_run
from typer.testing import CliRunner

import xclip
from xclip.attribution.engine import InteractionAttribution
from xclip.analysis.baseline_evaluation import SECOND_ORDER, SECOND_ORDER_INTERACTIONS, _one
from xclip.analysis.baselines import image_maps, token_maps
from xclip.cli.app import app
from xclip.analysis.faithfulness import (
    PairDecomposition,
    PairGame,
    curves,
    greedy_coalitions,
    input_states,
    interaction_terms,
    joint_coalitions,
    logit_bias,
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

    for coalitions, best in ((greedy_coalitions(np.zeros(6), weights, highest=True), highest),
                             (greedy_coalitions(np.zeros(6), weights, highest=False), lowest)):
        assert (coalitions.sum(1) == np.arange(7)).all()
        values = [weights[np.ix_(c, c)].sum() / 2 for c in coalitions]
        np.testing.assert_allclose(values, best)
    moved = moved_counts(6, 20)
    inserted, deleted = joint_coalitions(interaction_terms(interactions), moved)
    result = curves(surrogate, (inserted[:, :2], inserted[:, 2:]), (deleted[:, :2], deleted[:, 2:]), moved)
    np.testing.assert_allclose(result.insertion, highest[moved])
    np.testing.assert_allclose(result.deletion, lowest[6 - moved])
    assert inserted[2].tolist() == [True, False, False, True, False, False]  # the pair of largest interaction first


def test_greedy_coalitions_count_first_order_terms():
    """A player that matters alone (first order) and no interaction: the best single player is that one, and
    every coalition the greedy search returns is the best of its size (brute force over all subsets)."""
    rng = np.random.default_rng(4)
    n = 7
    first_order = rng.normal(size=n)
    weights = np.triu(rng.normal(scale=0.3, size=(n, n)), 1)
    weights = weights + weights.T
    values = {subset: first_order[list(subset)].sum() + weights[np.ix_(subset, subset)].sum() / 2
              for size in range(n + 1) for subset in itertools.combinations(range(n), size)}
    for highest in (True, False):
        coalitions = greedy_coalitions(first_order, weights, highest=highest)
        found = [values[tuple(np.flatnonzero(c))] for c in coalitions]
        best = [(max if highest else min)(v for s, v in values.items() if len(s) == size) for size in range(n + 1)]
        np.testing.assert_allclose(found, best)  # small and smooth enough for the greedy search to be exact
        assert np.flatnonzero(coalitions[1]) == [(np.argmax if highest else np.argmin)(first_order)]


def random_decomposition(seed: int, n_text: int = 5, n_image: int = 6, dim: int = 4) -> PairDecomposition:
    rng = np.random.default_rng(seed)
    return PairDecomposition(rng.normal(size=(n_text, dim)), rng.normal(size=(n_image, dim)),
                             rng.normal(size=dim), rng.normal(size=dim))


def test_predicted_joint_value_is_the_formula_by_plain_loops():
    """``v(T, P) - v(0, 0) = sum_{j in P} e_a(K_a) . C_b[j] + sum_{i in T} C_a[i] . e_b(K_b) + sum_{T x P} C_a[i] .
    C_b[j]``, with ``e_a(K_a) = e_ra + sum_{i in K_a} C_a[i]`` (the positions no coalition removes): the product
    of the two sides' predicted embeddings, relative to the empty coalition."""
    pair = random_decomposition(0)
    text_players, image_players = np.array([1, 2, 3]), np.array([1, 2, 3, 4, 5])  # text 0 and 4, image 0 always kept
    terms = pair.joint_terms(text_players, image_players)
    rng = np.random.default_rng(1)
    text_kept = rng.random((12, len(text_players))) < 0.5
    image_kept = rng.random((12, len(image_players))) < 0.5
    predicted = terms.predicted(text_kept, image_kept)
    for k in range(12):
        kept_a = [i for i in range(5) if i not in text_players]
        kept_b = [j for j in range(6) if j not in image_players]
        empty_a = pair.text_reference + sum(pair.text[i] for i in kept_a)
        empty_b = pair.image_reference + sum(pair.image[j] for j in kept_b)
        tokens = [i for i, keep in zip(text_players, text_kept[k]) if keep]
        patches = [j for j, keep in zip(image_players, image_kept[k]) if keep]
        value = 0.0
        for j in patches:
            value += float(empty_a @ pair.image[j])
        for i in tokens:
            value += float(pair.text[i] @ empty_b)
        for i in tokens:
            for j in patches:
                value += float(pair.text[i] @ pair.image[j])
        assert predicted[k] == pytest.approx(value, abs=1e-12)
        product = ((empty_a + sum(pair.text[i] for i in tokens)) @ (empty_b + sum(pair.image[j] for j in patches))
                   - empty_a @ empty_b)
        assert predicted[k] == pytest.approx(float(product), abs=1e-12)
    # with every position a player, the first-order terms are against the references themselves
    everyone = pair.joint_terms(np.arange(5), np.arange(6))
    np.testing.assert_allclose(everyone.image, pair.image @ pair.text_reference)
    np.testing.assert_allclose(everyone.text, pair.text @ pair.image_reference)
    np.testing.assert_allclose(everyone.interactions, pair.interactions)


def test_the_interactions_only_ranking_differs_where_first_order_terms_matter():
    """Patch 0 moves the image's embedding towards the reference caption and interacts with no token: the whole
    decomposition ranks it first, the interaction map's column sums last, and on the game the decomposition
    predicts the complete ranking has the larger area."""
    text = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # token 0 aligns with axis 0
    image = np.array([[0.0, 3.0, 0.0], [0.5, 0.0, 0.0], [0.2, 0.0, 0.0]])  # patch 0 along axis 1 only
    pair = PairDecomposition(text, image, text_reference=np.array([0.0, 1.0, 0.0]), image_reference=np.zeros(3))
    complete, interactions_only = pair.image_values(), pair.interactions.sum(0)
    assert np.argmax(complete) == 0 and np.argmin(interactions_only) == 0
    assert not np.array_equal(np.argsort(-complete), np.argsort(-interactions_only))
    whole = pair.joint_terms(np.array([], dtype=int), np.arange(3))  # the caption kept whole: the image game

    def game(text_kept, image_kept):
        return whole.predicted(text_kept, image_kept)

    moved = moved_counts(3, 20)
    areas = {}
    for name, values in (("complete", complete), ("interactions", interactions_only)):
        inserted, deleted = ranked_coalitions(values, moved)
        areas[name] = curves(game, image_only(inserted), image_only(deleted), moved).area
    assert areas["complete"] > areas["interactions"] + 1.0
    # the joint game: the interactions-only search never sees patch 0's own term
    joint_complete = joint_coalitions(pair.joint_terms(np.array([0, 1]), np.arange(3)), moved_counts(5, 20))[0]
    joint_interactions = joint_coalitions(interaction_terms(pair.interactions), moved_counts(5, 20))[0]
    assert joint_complete[1].tolist() == [False, False, True, False, False]
    assert joint_interactions[1].tolist() != joint_complete[1].tolist()


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


def test_the_complete_rankings_are_integrated_gradients_on_the_same_cut(model_dirs, images):
    """With the caption whole, patch j is worth e_a . C_b[j], the patch value of integrated gradients of the
    similarity with the caption on the same cut and the same nodes; with the image whole, token i is worth C_a[i]
    . e_b. The interaction map's sums alone rank otherwise."""
    model = xclip.load_model(model_dirs["clip"], dtype="float64", device="cpu")
    n_nodes = 24
    attribution = InteractionAttribution(model, n_steps=n_nodes, tolerance=None)
    captions = model.tokenize(["two blue circle and a square on the cat"])
    pictures = model.preprocess(images[:1])
    text = attribution.text_batch_contributions(captions)[0]
    image = attribution.image_batch_contributions(pictures)[0]
    pair = PairDecomposition.of(text, image)
    n_prefix = model.n_image_prefix
    patches = pair.image_values()[n_prefix:]
    gradients = image_maps(attribution, "integrated_gradients", text.embedding[None], pictures, [0], ig_steps=n_nodes)[0]
    np.testing.assert_allclose(patches, gradients, rtol=0, atol=1e-4 * np.abs(gradients).max())
    assert np.argsort(-patches).tolist() == np.argsort(-gradients).tolist()  # Spearman 1
    tokens = pair.text_values()
    token_gradients = token_maps(attribution, "integrated_gradients", captions, image.embedding[None], [0], ig_steps=n_nodes)[0]
    np.testing.assert_allclose(tokens, token_gradients, rtol=0, atol=1e-4 * np.abs(token_gradients).max())
    assert np.argsort(-tokens).tolist() == np.argsort(-token_gradients).tolist()
    # the interactions-only ranking is another one on this pair
    assert np.argsort(-pair.interactions[:, n_prefix:].sum(0)).tolist() != np.argsort(-patches).tolist()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_input_game_runs_between_the_models_logits(model_dirs, images, family):
    """Every player kept: the model's own logit of the caption and the image (transformers' forward pass);
    none kept: its logit of the reference caption (special tokens and filler) and the reference image."""
    model = xclip.load_model(model_dirs[family], dtype="float64", device="cpu")
    captions = model.tokenize(["a red dog"])
    # a filler that is not EOS (the tiny CLIP pads with EOS), so that transformers pools the reference caption
    # where the game does, at the caption's EOS
    filler = int(captions.input_ids[0, 1])
    attribution = InteractionAttribution(model, n_steps=2, tolerance=None, image_reference="black", text_filler=filler)
    pictures = model.preprocess(images[:1])
    text_states, image_states = input_states(attribution, captions, pictures)
    text_players = np.flatnonzero(~np.array(captions.tokens[0].special))
    image_players = np.arange(model.n_image_prefix, image_states.hidden.shape[1])
    game = PairGame(text_states, image_states, text_players, image_players, logit_scale=model.logit_scale,
                    logit_bias=logit_bias(model))
    everything = (np.ones((1, len(text_players)), bool), np.ones((1, len(image_players)), bool))
    nothing = (np.zeros((1, len(text_players)), bool), np.zeros((1, len(image_players)), bool))
    with torch.no_grad():
        logit = model.model(input_ids=captions.input_ids, pixel_values=pictures.pixel_values).logits_per_text
        reference_logit = model.model(input_ids=model.text_reference_ids(captions, filler),
                                      pixel_values=model.image_reference_pixels(pictures, "black")).logits_per_text
    assert game(*everything)[0] == pytest.approx(float(logit), abs=1e-9)
    assert game(*nothing)[0] == pytest.approx(float(reference_logit), abs=1e-9)
    assert (family == "siglip") == (logit_bias(model) != 0.0)  # SigLIP's bias is counted


@pytest.mark.slow  # three first-order methods on a run
def test_evaluate_baselines_pairs_each_method_with_the_planted_maps(tmp_path, model_dirs):
    run_file, annotations = synthetic_run(tmp_path, model_dirs)
    plant_phrase_maps(run_file, annotations, model_dirs, correct=True)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(tmp_path / "scenes" / "annotations.jsonl"),
                                 "--baselines", "random,integrated_gradients,centre", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "baselines.json").read_text())
    assert report["methods"] == [SECOND_ORDER, SECOND_ORDER_INTERACTIONS, "random", "integrated_gradients", "centre"]
    assert report["game"] == "cut"
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
    assert set(faithfulness[SECOND_ORDER_INTERACTIONS]) == {"image", "text", "joint"}
    assert SECOND_ORDER_INTERACTIONS not in overall  # the same map as second order: one grounding row
    assert faithfulness[SECOND_ORDER]["image"]["n"] == len(annotations)
    assert "insertion/deletion" in result.output and "second_order" in result.output
    assert (tmp_path / "run" / "evaluation" / "baselines_pointing_game.png").is_file()


@pytest.mark.slow  # a run and an evaluation per game
@pytest.mark.parametrize("game", ["cut", "input"])
def test_evaluate_baselines_without_annotations_scores_faithfulness_only(tmp_path, model_dirs, game):
    synthetic_run(tmp_path, model_dirs)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--baselines", "gradient_input", "--limit", "2",
                                 "--game", game, "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "baselines.json").read_text())
    assert "grounding" not in report and report["n_pairs"] == 2
    assert report["game"] == game and f"{game} game" in result.output
    # the cut game scores the cosine, the input game the logit (the tiny model's scale is far above 1)
    change = report["faithfulness_scale"]["mean_score_change"]
    assert abs(change) < 2 if game == "cut" else abs(change) > 0
    assert not (tmp_path / "run" / "evaluation" / "report.json").exists()


def test_evaluate_needs_annotations_or_baselines_and_refuses_unknown_methods(tmp_path, model_dirs):
    synthetic_run(tmp_path, model_dirs)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--baselines", "lime"])
    assert result.exit_code == 2 and "unknown baseline 'lime'" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--baselines", "random", "--game", "output"])
    assert result.exit_code == 2 and "unknown game 'output'" in result.output


@pytest.mark.parametrize("target", ["phrase", "caption"])
def test_a_first_order_method_explains_the_image_against_the_phrase_or_the_whole_caption(tmp_path, model_dirs, target):
    from xclip.analysis.baseline_evaluation import _phrase_maps
    from xclip.analysis.baselines import image_maps, text_embeddings
    from xclip.analysis.grounding import annotated_pairs
    from xclip.run.runner import load_attributor
    from xclip.store.reader import RunReader

    synthetic_run(tmp_path, model_dirs)
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
            # float32 sums in batches of other shapes: equal to a millionth of the map's largest value
            np.testing.assert_allclose(phrase_maps["integrated_gradients"], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
            assert not np.allclose(expected, caption_maps["integrated_gradients"][0])
