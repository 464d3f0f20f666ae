"""The synthetic world and the shipped demo model trained on it."""

from __future__ import annotations

import re

import numpy as np
import torch
from helpers import DEMO_MODEL

import xclip
from xclip.analysis.synthetic import COLOURS, SHAPES, generate, hard_negative, replacement_negative


def test_scenes_are_deterministic_and_annotated_exactly():
    first, again = generate(30, seed=7), generate(30, seed=7)
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    for scene in first:
        assert 1 <= len(scene.objects) <= 4
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)  # no object twice
        assert scene.phrases
        for phrase in scene.phrases:
            assert scene.caption[phrase.start : phrase.end] == phrase.text == f"{phrase.colour} {phrase.shape}"
            assert phrase.colour in COLOURS and phrase.shape in SHAPES
            x0, y0, x1, y1 = phrase.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # the object's colour is really drawn inside its box
            pixels = np.asarray(scene.image)[y0:y1, x0:x1].reshape(-1, 3)
            assert (np.abs(pixels - np.array(COLOURS[phrase.colour])).sum(1) == 0).any()


def test_hard_negatives_rebind_colours_and_keep_shapes():
    rng = np.random.default_rng(0)
    for scene in generate(50, seed=11):
        negative = hard_negative(rng, scene)
        assert negative != scene.caption
        for shape in SHAPES:
            assert negative.count(shape) == scene.caption.count(shape)


def test_replacement_negatives_name_one_missing_object_and_keep_the_count():
    rng = np.random.default_rng(0)
    for scene in generate(200, seed=12):
        negative = replacement_negative(rng, scene)
        true_words, negative_words = re.findall(r"\w+", scene.caption), re.findall(r"\w+", negative)
        assert len(negative_words) == len(true_words)  # same objects named, same template
        changed = [(a, b) for a, b in zip(true_words, negative_words) if a != b and a not in ("a", "an")]
        assert len(changed) == 1
        named = {tuple(p.text.split()) for p in scene.phrases}
        present = {(o.colour, o.shape) for o in scene.objects}
        negative_objects = {(w, negative_words[i + 1]) for i, w in enumerate(negative_words[:-1]) if w in COLOURS}
        assert len(negative_objects - present) == 1 and len(negative_objects & named) == len(named) - 1


def test_shipped_demo_model_text_cut_sees_a_word_and_its_predecessor():
    """The demo model's first text block attends only to each word and the one before it, so at the default cut
    a word's state is the same in every caption where it follows the same word at the same position: no
    position below the last block summarises the caption."""
    model = xclip.load_model(DEMO_MODEL, device="cpu")
    batch = model.tokenize(["a red circle and a blue star", "a red circle with a blue star"])
    hidden = model.text_hidden(batch.input_ids, batch.positions, len(model.text_blocks) - 1)
    # <sot> a red circle and|with a blue star <eos>: positions 4 and 5 see the differing word
    torch.testing.assert_close(hidden[0, 6:], hidden[1, 6:])
    assert (hidden[0, 4:6] - hidden[1, 4:6]).abs().amax(-1).min() > 0.1


def test_shipped_demo_model_binds_colour_to_shape():
    """On held-out scenes the shipped model prefers the true caption over its colour-swapped negative."""
    model = xclip.load_model(DEMO_MODEL, device="cpu")
    scenes = generate(100, seed=424242)
    rng = np.random.default_rng(1)
    captions = [s.caption for s in scenes] + [hard_negative(rng, s) for s in scenes]
    text = model.embed_text(model.tokenize(captions))
    images = model.embed_image(model.preprocess([s.image for s in scenes]).pixel_values)
    true, swapped = (text[:100] * images).sum(-1), (text[100:] * images).sum(-1)
    assert (true > swapped).float().mean() >= 0.85


def test_processor_sees_scenes_as_the_training_did():
    """Training normalised 64-pixel scenes directly; the shipped processor must not resample them."""
    model = xclip.load_model(DEMO_MODEL, device="cpu")
    (scene,) = generate(1, seed=5)
    processed = model.preprocess([scene.image]).pixel_values[0]
    mean = torch.tensor(model.image_processor.image_mean)[:, None, None]
    std = torch.tensor(model.image_processor.image_std)[:, None, None]
    manual = (torch.from_numpy(np.asarray(scene.image).copy()).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(processed, manual, rtol=0, atol=1e-5)
