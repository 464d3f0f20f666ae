"""Adaptive quadrature on the trained demo model: the default tolerance is met on every demo input, a fixed
N = 10 is not enough, the result equals a converged fixed rule, and inputs that miss the tolerance are flagged."""

from __future__ import annotations

import pytest
import torch
from helpers import DEMO_MODEL, demo_pairs

import xclip
from xclip.core.quadrature import DEFAULT_TOLERANCE, MIN_ADAPTIVE_STEPS

FLOAT32_FLOOR = 1e-5  # float32 rounding: every demo input gets below this, not every one below 1e-6 (docs/method.md)


@pytest.fixture(scope="module")
def demo_inputs() -> tuple[list[str], list]:
    return demo_pairs()


def attribute_inputs(attributor: xclip.InteractionAttribution, captions, images) -> list[xclip.Contributions]:
    return attributor.text_contributions(captions) + attributor.image_contributions(images)


def test_default_settings_meet_the_tolerance_on_every_demo_input(demo_model, demo_inputs):
    inputs = attribute_inputs(xclip.InteractionAttribution(demo_model), *demo_inputs)
    assert len(inputs) == 24
    for item in inputs:
        assert item.is_converged
        assert item.relative_completeness_error <= DEFAULT_TOLERANCE
        assert MIN_ADAPTIVE_STEPS <= item.n_nodes <= 256
    # the trained model needs more than the first two panels on most inputs: the refinement does the work
    assert sum(item.n_nodes > MIN_ADAPTIVE_STEPS for item in inputs) >= 12


def assert_flags_are_honest(inputs: list[xclip.Contributions], tolerance: float) -> None:
    """Flagged exactly when the input's own completeness error or its map error bound misses the tolerance."""
    for item in inputs:
        assert item.is_converged == (item.relative_completeness_error <= tolerance and item.map_error_bound <= tolerance)


@pytest.mark.slow  # adaptive rule to 1e-6 on the demo model, both dtypes
def test_a_tolerance_below_the_float32_floor_is_met_in_float64_and_flagged_in_float32(demo_model, demo_inputs):
    tight = 1e-6
    inputs = attribute_inputs(xclip.InteractionAttribution(demo_model, tolerance=tight, max_steps=512), *demo_inputs)
    assert_flags_are_honest(inputs, tight)
    if demo_model.dtype == torch.float64:
        assert all(item.is_converged for item in inputs)
    else:
        assert not all(item.is_converged for item in inputs)
        assert max(item.relative_completeness_error for item in inputs) <= FLOAT32_FLOOR
        # panels down at the rounding level are not bisected further: no input runs to the cap
        assert max(item.n_nodes for item in inputs) < 512


def test_fixed_ten_nodes_miss_the_tolerance_on_the_same_inputs(demo_model, demo_inputs):
    inputs = attribute_inputs(xclip.InteractionAttribution(demo_model, n_steps=10), *demo_inputs)
    missed = [item for item in inputs if item.relative_completeness_error > DEFAULT_TOLERANCE]
    assert len(missed) >= 12
    assert_flags_are_honest(inputs, DEFAULT_TOLERANCE)  # a fixed rule is checked against the tolerance too
    assert all(item.n_nodes == 10 for item in inputs)


@pytest.mark.slow  # converged fixed rule on the demo model
def test_adaptive_result_equals_a_converged_fixed_rule(demo_inputs):
    model = xclip.load_model(DEMO_MODEL, dtype="float64", device="cpu")
    captions, images = demo_inputs
    adaptive = attribute_inputs(xclip.InteractionAttribution(model), captions, images)
    converged = attribute_inputs(xclip.InteractionAttribution(model, n_steps=256), captions, images)
    for a, b in zip(adaptive, converged):
        assert b.relative_completeness_error < 1e-12
        # every position's contribution, not only their sum, is as accurate as the tolerance asks
        assert (a.values - b.values).norm() / b.values.norm() <= DEFAULT_TOLERANCE
    text, image = adaptive[:12], adaptive[12:]
    maps = xclip.interaction_maps(text, image, [(k, k) for k in range(12)])
    exact = xclip.interaction_maps(converged[:12], converged[12:], [(k, k) for k in range(12)])
    for m, e in zip(maps, exact):
        difference = (m.interactions - e.interactions).norm() / e.interactions.norm()
        assert difference <= 2 * DEFAULT_TOLERANCE + DEFAULT_TOLERANCE**2
        assert m.relative_completeness_error <= 2 * DEFAULT_TOLERANCE + DEFAULT_TOLERANCE**2


def test_a_low_cap_flags_the_inputs_that_miss_the_tolerance(demo_inputs):
    model = xclip.load_model(DEMO_MODEL, dtype="float64", device="cpu")
    captions, images = demo_inputs
    attributor = xclip.InteractionAttribution(model, max_steps=MIN_ADAPTIVE_STEPS, panel_layout="default")
    inputs = attribute_inputs(attributor, captions, images)
    assert sum(not item.is_converged for item in inputs) >= 12
    assert all(item.n_nodes == MIN_ADAPTIVE_STEPS for item in inputs)
    assert_flags_are_honest(inputs, DEFAULT_TOLERANCE)


@pytest.mark.slow  # adaptive rule on the demo model, many batches
def test_an_input_gets_the_same_map_whichever_batch_it_is_in(demo_inputs):
    model = xclip.load_model(DEMO_MODEL, dtype="float64", device="cpu")
    captions, images = demo_inputs
    together = attribute_inputs(xclip.InteractionAttribution(model, internal_batch_size=1000), captions[:6], images[:6])
    for k in range(6):
        for internal_batch_size in (1, 64):
            attributor = xclip.InteractionAttribution(model, internal_batch_size=internal_batch_size)
            alone = attribute_inputs(attributor, captions[k : k + 1], images[k : k + 1])
            for a, b in zip(alone, (together[k], together[6 + k])):
                assert a.n_nodes == b.n_nodes
                torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-12)


def test_pair_error_is_the_exact_cross_term_of_the_inputs_residuals_and_within_the_bound(demo_inputs):
    model = xclip.load_model(DEMO_MODEL, dtype="float64", device="cpu")
    captions, images = demo_inputs
    attributor = xclip.InteractionAttribution(model, n_steps=4)  # coarse, so the errors are far from zero
    text, image = attributor.text_contributions(captions[:4]), attributor.image_contributions(images[:4])
    pairs = [(i, j) for i in range(4) for j in range(4)]
    for (i, j), m in zip(pairs, xclip.interaction_maps(text, image, pairs)):
        a, b = text[i], image[j]
        d_a, d_b = a.embedding - a.reference_embedding, b.embedding - b.reference_embedding
        eps_a, eps_b = a.values.sum(0) - d_a, b.values.sum(0) - d_b
        cross = float(d_a @ eps_b + eps_a @ d_b + eps_a @ eps_b)
        assert float(m.interactions.sum()) - m.four_term_value == pytest.approx(cross, abs=1e-12)
        assert m.completeness_error <= m.completeness_bound * (1 + 1e-9)
        assert m.completeness_bound == pytest.approx(
            float(eps_a.norm() * d_b.norm() + d_a.norm() * eps_b.norm() + eps_a.norm() * eps_b.norm()), rel=1e-9
        )
        assert m.score_scale == pytest.approx(float(d_a.norm() * d_b.norm()), rel=1e-9)
