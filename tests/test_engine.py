"""The attribution engine against its exact identities, a naive implementation and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CAPTIONS, make_images
from naive import integrated_jacobian, naive_interactions

import xclip
from xclip.core.interaction import contributions
from xclip.core.quadrature import PathQuadrature, quadrature
from xclip.core.transformer import Positions, UpperEncoder, embed_from_hidden


def relative_errors(maps: list[xclip.InteractionMap]) -> list[float]:
    return [m.completeness_error / max(abs(m.four_term_value), 1e-3) for m in maps]


@pytest.mark.parametrize("layer", [-1, 0])
def test_maps_sum_to_four_term_value(model64, images, layer):
    attributor = xclip.InteractionAttribution(model64, text_layer=layer, image_layer=layer, n_steps=16)
    maps = attributor.attribute(CAPTIONS, images)
    for m in maps:
        assert abs(m.four_term_value) > 1e-4  # the identity is not trivially 0 = 0
        assert m.completeness_error <= max(1e-5 * abs(m.four_term_value), 1e-8)
        assert float(m.interactions.sum()) == pytest.approx(m.four_term_value, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("method", ["gauss-legendre", pytest.param("midpoint", marks=pytest.mark.slow),
                                    pytest.param("riemann-right", marks=pytest.mark.slow)])
def test_completeness_error_falls_with_steps(model64, images, method):
    def worst(n_steps: int) -> float:
        attributor = xclip.InteractionAttribution(model64, n_steps=n_steps, rule=method, text_layer=0, image_layer=0)
        return max(relative_errors(attributor.attribute(CAPTIONS, images)))

    errors = {n: worst(n) for n in (2, 4, 8, 16)}
    assert errors[16] < errors[8]
    assert errors[16] < errors[2]
    if method != "riemann-right":  # first-order and pre-asymptotic: riemann-right may wobble at N = 4
        assert errors[8] < errors[4]


def test_gauss_legendre_beats_reference_rule(model64, images):
    def worst(method: str) -> float:
        attributor = xclip.InteractionAttribution(model64, n_steps=10, rule=method)
        return max(relative_errors(attributor.attribute(CAPTIONS, images)))

    assert worst("gauss-legendre") < worst("midpoint") < worst("riemann-right")


def _tower_inputs(model, caption, image, layer):
    text = model.tokenize([caption])
    text_hidden = model.text_hidden(text.input_ids, text.positions, layer)
    text_reference = model.text_hidden(model.text_reference_ids(text), text.positions, layer)
    pixels = model.preprocess([image])
    image_hidden = model.image_hidden(pixels.pixel_values, layer)
    image_reference = model.image_hidden(model.image_reference_pixels(pixels), layer)
    image_positions = Positions(pooled_index=model.image_pooled_index(1))
    return (
        (model.text_upper(layer), text_hidden, text_reference, text.positions),
        (model.image_upper(layer), image_hidden, image_reference, image_positions),
    )


@pytest.mark.parametrize("layer", [-1, 0])
def test_equals_naive_feature_pair_implementation(model64, images, layer):
    n_steps, method = 6, "gauss-legendre"
    resolved = layer % len(model64.text_blocks)
    text, image = _tower_inputs(model64, CAPTIONS[1], images[0], resolved)
    alphas, weights = quadrature(method, n_steps)
    naive = naive_interactions(
        integrated_jacobian(*text, alphas, weights),
        (text[1] - text[2])[0],
        integrated_jacobian(*image, alphas, weights),
        (image[1] - image[2])[0],
    )
    attributor = xclip.InteractionAttribution(
        model64, text_layer=layer, image_layer=layer, n_steps=n_steps, rule=method
    )
    (engine,) = attributor.attribute([CAPTIONS[1]], [images[0]])
    assert engine.interactions.shape == naive.shape  # a lone caption has no padding: every position is kept
    torch.testing.assert_close(engine.interactions, naive, rtol=0, atol=1e-6 * naive.abs().max().item())


def test_contributions_match_finite_differences(model64):
    # one midpoint node: C[s] = J(r + delta / 2) delta[s], a directional derivative
    upper, hidden, reference, positions = _tower_inputs(model64, CAPTIONS[0], make_images(1)[0], 0)[0]
    one_midpoint = PathQuadrature(n_steps=1, rule="midpoint")
    values = contributions(upper, hidden, reference, positions, quadrature=one_midpoint).values[0]
    middle = (reference + hidden) / 2
    delta = hidden - reference
    eps = 1e-5
    for s in range(values.shape[0]):
        step = torch.zeros_like(delta)
        step[:, s] = eps * delta[:, s]
        plus = embed_from_hidden(upper, middle + step, positions, normalize=True)
        minus = embed_from_hidden(upper, middle - step, positions, normalize=True)
        torch.testing.assert_close(values[s], ((plus - minus) / (2 * eps))[0], rtol=0, atol=1e-8)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_modes_agree_with_default_path(model64, images, mode):
    default = xclip.InteractionAttribution(model64, n_steps=4).attribute(CAPTIONS, images)
    other = xclip.InteractionAttribution(model64, n_steps=4, mode=mode).attribute(CAPTIONS, images)
    for a, b in zip(default, other):
        torch.testing.assert_close(a.interactions, b.interactions, rtol=0, atol=1e-12)


@pytest.mark.parametrize("internal_batch_size", [*(pytest.param(n, marks=pytest.mark.slow) for n in (1, 3)), 1000])
def test_batch_invariance(model64, internal_batch_size):
    images = make_images(3)
    settings = {"n_steps": 5, "internal_batch_size": internal_batch_size}
    batched = xclip.InteractionAttribution(model64, **settings).attribute(CAPTIONS, images)
    one_by_one = [
        xclip.InteractionAttribution(model64, **settings).attribute([caption], [image])[0]
        for caption in CAPTIONS
        for image in images
    ]
    for a, b in zip(batched, one_by_one):
        torch.testing.assert_close(a.interactions, b.interactions, rtol=0, atol=1e-12)
        assert a.score == pytest.approx(b.score, abs=1e-12)


def test_float32_agrees_with_float64(model32, model64, images):
    maps32 = xclip.InteractionAttribution(model32, n_steps=8).attribute(CAPTIONS, images)
    maps64 = xclip.InteractionAttribution(model64, n_steps=8).attribute(CAPTIONS, images)
    for a, b in zip(maps32, maps64):
        assert a.interactions.dtype == torch.float32
        scale = b.interactions.abs().max().item()
        torch.testing.assert_close(a.interactions.double(), b.interactions, rtol=0, atol=1e-4 * scale)


def test_every_layer_works(model64, images):
    n_layers = len(model64.text_blocks)
    for layer in [*range(n_layers), *range(-n_layers, 0)]:
        (m,) = xclip.InteractionAttribution(model64, text_layer=layer, image_layer=layer, n_steps=12).attribute(
            CAPTIONS[:1], images[:1]
        )
        assert m.completeness_error <= 1e-4 * max(abs(m.four_term_value), 1e-3)


def test_linear_toy_encoder_has_closed_form_contributions():
    # g(x) = sum_s W[s] x[s]: every rule is exact and C[s] = W[s] (x[s] - r[s])
    torch.manual_seed(1)
    weights_per_position = torch.randn(3, 4, 5, dtype=torch.float64)  # (S, d, E)
    upper = UpperEncoder(blocks=(), readout=lambda h: torch.einsum("bsd,sde->be", h, weights_per_position))
    hidden, reference = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    expected = torch.einsum("bsd,sde->bse", hidden - reference, weights_per_position)
    for method in ("gauss-legendre", "midpoint", "riemann-right"):
        for mode in ("forward", "reverse"):
            path = contributions(
                upper, hidden, reference, Positions(), quadrature=PathQuadrature(n_steps=3, rule=method), normalize=False, mode=mode
            )
            torch.testing.assert_close(path.values, expected, rtol=0, atol=1e-12)


def test_image_image_and_text_text_maps_are_exact(model64):
    attributor = xclip.InteractionAttribution(model64, n_steps=16)
    image_a, image_b = attributor.image_contributions(make_images(2, seed=3))
    text_a, text_b = attributor.text_contributions(CAPTIONS)
    for a, b in ((image_a, image_b), (text_a, text_b)):
        m = xclip.interaction_map(a, b)
        assert m.interactions.shape == (a.values.shape[0], b.values.shape[0])
        assert m.completeness_error <= max(1e-5 * abs(m.four_term_value), 1e-8)


def test_logit_scale_multiplies_maps_and_terms(model64, images):
    plain = xclip.InteractionAttribution(model64, n_steps=4).attribute(CAPTIONS[:1], images[:1])[0]
    scaled = xclip.InteractionAttribution(model64, n_steps=4, scale_by_logit=True).attribute(
        CAPTIONS[:1], images[:1]
    )[0]
    factor = model64.logit_scale
    assert factor != pytest.approx(1.0)
    torch.testing.assert_close(scaled.interactions, plain.interactions * factor)
    assert scaled.four_term_value == pytest.approx(plain.four_term_value * factor)


def test_bfloat16_model_is_differentiated_in_float32(model_dirs, family, images):
    """Below the cut the model runs in bfloat16; above it in float32, so completeness stays at float32 level."""
    model = xclip.load_model(model_dirs[family], dtype="bfloat16", device="cpu")
    attributor = xclip.InteractionAttribution(model, n_steps=12)
    assert model.dtype == torch.bfloat16  # the model itself is not converted
    for m in attributor.attribute(CAPTIONS, images):
        assert m.interactions.dtype == torch.float32
        assert m.completeness_error <= 1e-4 * max(abs(m.four_term_value), 1e-2)


def test_pair_numbers_equal_the_maps_numbers(model64, images):
    """Without maps, a pair's numbers come from the inputs' summed contributions: the same numbers."""
    attributor = xclip.InteractionAttribution(model64, n_steps=3)  # a coarse rule: errors well above rounding
    text = attributor.text_contributions(["a red dog", "two blue circle and a square on the cat"])
    image = attributor.image_contributions(images)
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for scale in (1.0, 7.5):
        for full, brief in zip(xclip.interaction_maps(text, image, pairs, logit_scale=scale),
                               xclip.pair_numbers(text, image, pairs, logit_scale=scale)):
            assert brief.score == full.score and torch.equal(brief.terms, full.terms)
            assert brief.completeness_error == pytest.approx(full.completeness_error, rel=1e-9, abs=1e-15)
            assert brief.completeness_error > 1e-9  # a real error, not rounding
            assert (brief.completeness_bound, brief.score_scale) == (full.completeness_bound, full.score_scale)


def test_pair_map_error_bound_is_its_formula_and_holds(model64, images):
    """Each pair's bound is (rho_a |C_a|_F |C_b|_2 + rho_b |C_a|_2 |C_b|_F + rho_a rho_b |C_a|_F |C_b|_F) / |map|_F,
    written here pair by pair, and the map's actual relative error against a 96-node rule stays within it."""
    captions = ["a red dog", "two blue circle and a square on the cat", "a cat"]
    coarse = xclip.InteractionAttribution(model64, tolerance=1e-2)  # loose: errors far above rounding
    exact = xclip.InteractionAttribution(model64, n_steps=96)
    text, image = coarse.text_contributions(captions), coarse.image_contributions(images)
    text_true, image_true = exact.text_contributions(captions), exact.image_contributions(images)
    pairs = [(c, i) for c in range(len(captions)) for i in range(len(images))]
    maps, numbers = xclip.interaction_maps(text, image, pairs), xclip.pair_numbers(text, image, pairs)
    for (c, i), pair_map, brief in zip(pairs, maps, numbers):
        a, b = text[c].values.double(), image[i].values.double()
        rho_a, rho_b = text[c].map_error_bound, image[i].map_error_bound
        assert 0 < rho_a <= 1e-2 and 0 < rho_b <= 1e-2
        spectral_a, spectral_b = torch.linalg.matrix_norm(a, ord=2), torch.linalg.matrix_norm(b, ord=2)
        error = rho_a * a.norm() * spectral_b + rho_b * spectral_a * b.norm() + rho_a * rho_b * a.norm() * b.norm()
        expected = float(error / (a @ b.T).norm())
        assert pair_map.map_error_bound == pytest.approx(expected, rel=1e-9)
        assert brief.map_error_bound == pytest.approx(expected, rel=1e-6)  # from Gram matrices, not the map
        true_map = text_true[c].values.double() @ image_true[i].values.double().T
        actual = float((pair_map.interactions.double() - true_map).norm() / true_map.norm())
        assert actual <= pair_map.map_error_bound


def test_a_fixed_rule_gives_pairs_no_map_error_bound(model64, images):
    attributor = xclip.InteractionAttribution(model64, n_steps=4)
    text, image = attributor.text_contributions(["a red dog"]), attributor.image_contributions(images[:1])
    assert math.isnan(xclip.interaction_maps(text, image, [(0, 0)])[0].map_error_bound)
    assert math.isnan(xclip.pair_numbers(text, image, [(0, 0)])[0].map_error_bound)
