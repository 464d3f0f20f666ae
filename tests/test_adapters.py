"""Family adapters: equality with the HF model, token geometry, references and input errors."""

from __future__ import annotations

import pytest
import torch
from helpers import CAPTIONS, make_images

import xclip
from xclip.core.transformer import Positions, embed_from_hidden


def test_split_at_every_layer_reproduces_hf_features(model64):
    captions, images = CAPTIONS, make_images(3)
    encoded = model64._encode_captions(captions)
    kwargs = {"attention_mask": encoded.attention_mask} if model64.family == "clip" else {}
    hf_text = model64.model.get_text_features(input_ids=encoded.input_ids, **kwargs).pooler_output
    pixels = model64.preprocess(images).pixel_values
    hf_image = model64.model.get_image_features(pixel_values=pixels).pooler_output
    text = model64.tokenize(captions)
    image_positions = Positions(pooled_index=model64.image_pooled_index(len(images)))
    for layer in range(len(model64.text_blocks)):
        hidden = model64.text_hidden(text.input_ids, text.positions, layer)
        ours = embed_from_hidden(model64.text_upper(layer), hidden, text.positions, normalize=False)
        torch.testing.assert_close(ours, hf_text, rtol=0, atol=1e-12)
        hidden = model64.image_hidden(pixels, layer)
        ours = embed_from_hidden(model64.image_upper(layer), hidden, image_positions, normalize=False)
        torch.testing.assert_close(ours, hf_image, rtol=0, atol=1e-12)
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(model64.embed_text(text), normalize(hf_text, dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(model64.embed_image(pixels), normalize(hf_image, dim=-1), rtol=0, atol=1e-12)


def test_caption_geometry(model64):
    (short, long) = xclip.InteractionAttribution(model64, n_steps=2).text_contributions(CAPTIONS)
    if model64.family == "clip":
        assert short.labels == ["<|startoftext|>", "a</w>", "red</w>", "dog</w>", "<|endoftext|>"]
        assert short.values.shape[0] == 5  # BOS..EOS, padding dropped
        assert long.labels[0] == "<|startoftext|>" and long.labels[-1] == "<|endoftext|>"
    else:  # SigLIP: no BOS, padded to the full context, every position takes part in attention
        assert short.labels[:4] == ["a", "red", "dog", "</s>"]
        assert short.values.shape[0] == long.values.shape[0] == 64


def test_image_geometry(model64):
    (image,) = xclip.InteractionAttribution(model64, n_steps=2).image_contributions(make_images(1))
    assert image.grid == (4, 4)
    assert image.n_prefix == (1 if model64.family == "clip" else 0)
    assert image.values.shape[0] == image.n_prefix + 16
    assert image.labels[image.n_prefix] == "patch(0,0)" and image.labels[-1] == "patch(3,3)"


def test_text_reference_keeps_length_and_eos_position(model64):
    batch = model64.tokenize(CAPTIONS)
    reference = model64.text_reference_ids(batch)
    assert reference.shape == batch.input_ids.shape
    pad = model64.tokenizer.pad_token_id
    for b in range(len(CAPTIONS)):
        eos = int(batch.eos_index[b])
        assert int(reference[b, eos]) == model64.tokenizer.eos_token_id
        start = 1 if model64.family == "clip" else 0  # CLIP keeps BOS
        assert reference[b, start:eos].eq(pad).all()
        torch.testing.assert_close(reference[b, eos:], batch.input_ids[b, eos:])
    custom = model64.text_reference_ids(batch, filler_id=7)
    assert int(custom[1, 1]) == 7


@pytest.mark.parametrize("reference", ["zeros", "black", "blur", "noise"])
def test_image_references(model64, reference):
    images = make_images(2)
    batch = model64.preprocess(images)
    pixels = model64.image_reference_pixels(batch, reference, seed=3)
    again = model64.image_reference_pixels(batch, reference, seed=3)
    torch.testing.assert_close(pixels, again)
    if reference == "zeros":
        assert pixels.abs().max() == 0
    if reference == "black":  # black pixels normalise to -mean/std
        mean, std = model64.image_processor.image_mean, model64.image_processor.image_std
        assert pixels[0, 0, 0, 0].item() == pytest.approx(-mean[0] / std[0])
    if reference == "blur":  # one reference per image, smoother than the image
        assert pixels.shape[0] == 2
        assert pixels.diff(dim=-1).abs().mean() < batch.pixel_values.diff(dim=-1).abs().mean() / 2
    maps = xclip.InteractionAttribution(model64, n_steps=16, image_reference=reference).attribute(
        CAPTIONS[:1], images
    )
    for m in maps:
        assert m.completeness_error <= max(1e-5 * abs(m.four_term_value), 1e-8)


def test_reference_convention_reproduces_the_public_code(model64):
    """Reference convention: unnormalised g, right Riemann, [BOS, 0, EOS, 0...] pooled at its own EOS."""
    images = make_images(1)
    attributor = xclip.InteractionAttribution(model64, convention="reference", rule="riemann-right", n_steps=10)
    (text,) = attributor.text_contributions(CAPTIONS[:1])
    batch = model64.tokenize(CAPTIONS[:1])
    ids = model64.paper_code_text_ids(batch)
    first = 1 if model64.family == "clip" else 0
    assert ids[0, first].item() == 0 and ids[0, first + 1].item() == model64.tokenizer.eos_token_id
    assert ids[0, first + 2 :].eq(0).all()
    # its reference embedding is the model's feature of the reference ids, pooled by the family's own rule
    kwargs = {"attention_mask": torch.ones_like(ids)} if model64.family == "clip" else {}
    expected = model64.model.get_text_features(input_ids=ids, **kwargs).pooler_output[0]
    torch.testing.assert_close(text.reference_embedding, torch.nn.functional.normalize(expected, dim=-1))
    (m,) = attributor.attribute(CAPTIONS[:1], images)
    exact = xclip.InteractionAttribution(model64, n_steps=10).attribute(CAPTIONS[:1], images)[0]
    assert m.score == pytest.approx(exact.score, abs=1e-12)  # same model score, different decomposition
    assert exact.completeness_error < m.completeness_error


def test_bad_inputs_raise_clear_errors(model64):
    with pytest.raises(xclip.ConfigError, match="text layer 5 is out of range.*2 blocks"):
        xclip.InteractionAttribution(model64, text_layer=5)
    with pytest.raises(xclip.ConfigError, match="image layer -3 is out of range"):
        xclip.InteractionAttribution(model64, image_layer=-3)
    attributor = xclip.InteractionAttribution(model64, n_steps=2)
    with pytest.raises(xclip.InputError, match="caption 1: the caption is empty"):
        attributor.text_contributions(["a dog", "   "])
    with pytest.raises(xclip.InputError, match="must be PIL images or paths, got int"):
        attributor.image_contributions([3])
    with pytest.raises(xclip.InputError, match="image file not found: .*missing.png"):
        attributor.image_contributions(["missing.png"])
    with pytest.raises(xclip.ConfigError, match="unknown quadrature rule 'simpson'"):
        xclip.InteractionAttribution(model64, rule="simpson")
    with pytest.raises(xclip.ConfigError, match="convention 'reference' .* give n_steps"):
        xclip.InteractionAttribution(model64, convention="reference")
    with pytest.raises(xclip.ConfigError, match="rule 'riemann-right' is for fixed-step comparisons"):
        xclip.InteractionAttribution(model64, rule="riemann-right")
    with pytest.raises(AttributeError):  # a changed setting would be ignored: it cannot be changed
        attributor.n_steps = 10


def test_images_load_from_paths(model64, tmp_path):
    image = make_images(1)[0]
    path = tmp_path / "img.png"
    image.save(path)
    attributor = xclip.InteractionAttribution(model64, n_steps=2)
    (from_path,) = attributor.image_contributions([path])
    (from_pil,) = attributor.image_contributions([image])
    torch.testing.assert_close(from_path.values, from_pil.values)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(xclip.InputError, match="cannot read image .*bad.png"):
        attributor.image_contributions([tmp_path / "bad.png"])


def test_unknown_family_and_missing_model(tmp_path):
    with pytest.raises(xclip.ModelFamilyError, match=f"no model directory at {tmp_path}/nothing-here"):
        xclip.load_model(tmp_path / "nothing-here", device="cpu", local_files_only=True)
    with pytest.raises(xclip.ModelFamilyError, match="no adapter for model_type 'bert'.*clip, siglip"):
        xclip.get_adapter_cls("bert")
    with pytest.raises(xclip.ConfigError, match="unknown dtype 'float8'"):
        xclip.load_model(tmp_path, dtype="float8", device="cpu")
