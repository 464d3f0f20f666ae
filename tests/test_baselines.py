"""First-order baselines against plainly written references built from the Hugging Face models' own modules.

Every reference below runs HF's layers (``CLIPEncoderLayer.forward``, the attention-pooling head, eager
attention with ``output_attentions``) or their ``nn.Linear``/``nn.LayerNorm`` submodules directly, never xclip's
``Block``, ``block_forward`` or ``embed_from_hidden``, so the generic block code is checked against HF's layers.
The models are the tiny random checkpoints of ``conftest`` in float64, with 2 images and 2 captions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import CAPTIONS, make_images
from torch import Tensor

import xclip
from xclip.analysis.baselines import FIRST_ORDER, POOLED_METHODS, _path_gradients, check_methods, image_maps, token_maps
from xclip.core.quadrature import quadrature
from xclip.errors import ConfigError

ITEMS = [0, 1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: one intra-op thread runs them about 15 times faster than two on a busy 2-core
    machine, where the second thread waits for a core (a 128-node rule: 0.2 s against 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the models, twice: through xclip, and straight from transformers ----------------------------------------
@pytest.fixture(scope="module")
def clip(model_dirs):
    return xclip.load_model(model_dirs["clip"], dtype="float64", device="cpu")


@pytest.fixture(scope="module")
def siglip(model_dirs):
    return xclip.load_model(model_dirs["siglip"], dtype="float64", device="cpu")


def _hf(directory: str, family: str, attention: str):
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    return cls.from_pretrained(directory, dtype=torch.float64, attn_implementation=attention).eval()


@pytest.fixture(scope="module")
def hf_clip(model_dirs):
    """float64 throughout (SDPA keeps float64; HF's eager path takes its softmax in float32)."""
    return _hf(model_dirs["clip"], "clip", "sdpa")


@pytest.fixture(scope="module")
def hf_clip_eager(model_dirs):
    """Eager attention, so that ``output_attentions`` returns the probabilities (softmax taken in float32)."""
    return _hf(model_dirs["clip"], "clip", "eager")


@pytest.fixture(scope="module")
def hf_siglip(model_dirs):
    return _hf(model_dirs["siglip"], "siglip", "sdpa")


@pytest.fixture(scope="module")
def pixels(clip):
    return clip.preprocess(make_images(2))


def features(output) -> Tensor:
    """``get_*_features``: a tensor in transformers 4, an output whose ``pooler_output`` is projected in 5."""
    return output if isinstance(output, Tensor) else output.pooler_output


def run_layer(layer, hidden: Tensor, mask: Tensor | None) -> Tensor:
    """One HF encoder layer by its own forward."""
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


def cosine(a: Tensor, b: Tensor) -> Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def hf_clip_text_inputs(model, hf):
    """input_ids, the additive (causal + padding) mask HF builds, and HF's EOS pooling index."""
    encoded = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    ids, keep = encoded["input_ids"], encoded["attention_mask"].bool()
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & keep[:, None, :]  # query i sees key j <= i, not padding
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)[:, None]
    eos = (ids == hf.config.text_config.eos_token_id).int().argmax(-1)  # HF: first EOS (eos_token_id != 2)
    return ids, encoded["attention_mask"], mask, eos


def clip_image_targets(hf, pixel_values: Tensor) -> Tensor:
    with torch.no_grad():
        return F.normalize(features(hf.get_image_features(pixel_values=pixel_values)), dim=-1)


def clip_text_targets(model, hf) -> Tensor:
    ids, keep, _, _ = hf_clip_text_inputs(model, hf)
    with torch.no_grad():
        return F.normalize(features(hf.get_text_features(input_ids=ids, attention_mask=keep)), dim=-1)


# --- the CLIP image tower above and below the cut, from HF's modules ------------------------------------------
def clip_image_below(hf, pixel_values: Tensor) -> Tensor:
    """Hidden states entering the last vision layer: embeddings, pre_layrnorm, every earlier layer."""
    vision = hf.vision_model
    with torch.no_grad():
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers[:-1]:
            hidden = run_layer(layer, hidden, None)
    return hidden


def clip_image_score(hf, hidden: Tensor, targets: Tensor) -> Tensor:
    """``cos(t, visual_projection(post_layernorm(CLS of the last layer)))`` from the last layer's input."""
    vision = hf.vision_model
    final = run_layer(vision.encoder.layers[-1], hidden, None)
    return cosine(hf.visual_projection(vision.post_layernorm(final[:, 0])), targets)


def clip_text_below(hf, ids: Tensor, mask: Tensor) -> Tensor:
    text = hf.text_model
    with torch.no_grad():
        hidden = text.embeddings(input_ids=ids)
        for layer in text.encoder.layers[:-1]:
            hidden = run_layer(layer, hidden, mask)
    return hidden


def clip_text_score(hf, hidden: Tensor, mask: Tensor, eos: Tensor, targets: Tensor) -> Tensor:
    text = hf.text_model
    final = text.final_layer_norm(run_layer(text.encoder.layers[-1], hidden, mask))
    return cosine(hf.text_projection(final[torch.arange(len(eos)), eos]), targets)


def reference_ig(score, hidden: Tensor, reference: Tensor, n_nodes: int | None) -> Tensor:
    """``(h - r) . sum_k w_k grad s(r + a_k (h - r))`` summed over the hidden dimension, ``(B, S)``; ``None``:
    gradient x input, ``grad s(h) . (h - r)``."""
    reference = reference.expand_as(hidden)
    delta = hidden - reference
    alphas, weights = quadrature("gauss-legendre", n_nodes) if n_nodes else (torch.ones(1), torch.ones(1))
    total = torch.zeros_like(hidden)
    for alpha, weight in zip(alphas.tolist(), weights.tolist()):
        point = (reference + alpha * delta).detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(score(point).sum(), point)
        total += weight * gradient
    return (total * delta).sum(-1)


@pytest.fixture(scope="module")
def clip_image_setting(clip, hf_clip, pixels):
    """(attribution, targets, the cut's hidden states and reference, checked against HF's own layers)."""
    attribution = xclip.InteractionAttribution(clip)
    targets = clip_text_targets(clip, hf_clip)
    hidden = clip_image_below(hf_clip, pixels.pixel_values)
    reference = clip_image_below(hf_clip, torch.zeros_like(pixels.pixel_values[:1]))  # the "zeros" reference
    cut = attribution.image_cut(pixels)
    torch.testing.assert_close(cut.hidden, hidden, rtol=0, atol=1e-12)
    torch.testing.assert_close(cut.reference, reference, rtol=0, atol=1e-12)
    with torch.no_grad():  # the score from the cut is the score of the whole HF model
        whole = cosine(features(hf_clip.get_image_features(pixel_values=pixels.pixel_values)), targets)
        torch.testing.assert_close(clip_image_score(hf_clip, hidden, targets), whole, rtol=0, atol=1e-12)
    return attribution, targets, hidden, reference


# --- 1, 3: gradient methods on the image tower -------------------------------------------------------------
def test_integrated_gradients_on_patches_equal_hand_written_sum_over_hf_layers(clip_image_setting, hf_clip, pixels):
    attribution, targets, hidden, reference = clip_image_setting
    n_nodes = 8
    expected = reference_ig(lambda h: clip_image_score(hf_clip, h, targets), hidden, reference, n_nodes)
    ours = image_maps(attribution, "integrated_gradients", targets, pixels, ITEMS, ig_steps=n_nodes)
    assert ours.shape == (2, 16)
    assert np.abs(expected[:, 1:].numpy()).max() > 1e-4  # not a trivial 0 = 0
    np.testing.assert_allclose(ours, expected[:, 1:].numpy(), rtol=1e-8, atol=1e-12)
    other = image_maps(attribution, "integrated_gradients", targets, pixels, ITEMS, ig_steps=3)
    assert np.abs(other - ours).max() > 1e-9  # ig_steps is used (the nodes matter at this precision)


def test_integrated_gradients_complete_over_cls_and_patches(clip_image_setting, hf_clip, pixels):
    """Sum over every position (CLS + patches) = s(h) - s(r), with s from the whole HF model on the pixels.

    The integrand is analytic on a neighbourhood of [0, 1], so the Gauss-Legendre error falls geometrically with
    the nodes: on these inputs 8e-7 at 8 nodes, 3e-10 at 16, 1e-16 (rounding) from 32 on. At 128 nodes only the
    float64 rounding of the sums is left (measured 1e-16; a few 1e-15 at worst for ~70000 terms of size < 1).
    1e-10 sits orders of magnitude above that and below what any real fault moves: every position's value is at
    least 3e-5 here, so dropping one position (the CLS, say) or mis-weighting a node fails the check."""
    attribution, targets, _, _ = clip_image_setting
    cut = attribution.image_cut(pixels)
    values = _path_gradients(cut, targets, 128)
    with torch.no_grad():
        s_h = cosine(features(hf_clip.get_image_features(pixel_values=pixels.pixel_values)), targets)
        s_r = cosine(features(hf_clip.get_image_features(pixel_values=torch.zeros_like(pixels.pixel_values))), targets)
    assert (s_h - s_r).abs().min() > 1e-3
    assert values[:, 0].abs().min() > 1e-6  # the CLS position carries part of the difference
    torch.testing.assert_close(values.sum(-1), s_h - s_r, rtol=0, atol=1e-10)
    patches = image_maps(attribution, "integrated_gradients", targets, pixels, ITEMS, ig_steps=128)
    np.testing.assert_allclose(patches, values[:, 1:].numpy(), rtol=0, atol=1e-14)


def test_gradient_input_on_patches(clip_image_setting, hf_clip, pixels):
    attribution, targets, hidden, reference = clip_image_setting
    expected = reference_ig(lambda h: clip_image_score(hf_clip, h, targets), hidden, reference, None)
    ours = image_maps(attribution, "gradient_input", targets, pixels, ITEMS)
    assert np.abs(expected[:, 1:].numpy()).max() > 1e-4
    np.testing.assert_allclose(ours, expected[:, 1:].numpy(), rtol=1e-8, atol=1e-12)


# --- 2: the caption tokens -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["integrated_gradients", "gradient_input"])
def test_token_maps_equal_hand_written_reference_over_hf_text_layers(clip, hf_clip, pixels, method):
    attribution = xclip.InteractionAttribution(clip)
    batch = clip.tokenize(CAPTIONS)
    ids, keep, mask, eos = hf_clip_text_inputs(clip, hf_clip)
    assert torch.equal(ids, batch.input_ids) and torch.equal(eos, batch.eos_index)
    targets = clip_image_targets(hf_clip, pixels.pixel_values)
    hidden = clip_text_below(hf_clip, ids, mask)
    reference = clip_text_below(hf_clip, clip.text_reference_ids(batch), mask)
    cut = attribution.text_cut(batch)
    torch.testing.assert_close(cut.hidden, hidden, rtol=0, atol=1e-12)
    torch.testing.assert_close(cut.reference, reference, rtol=0, atol=1e-12)

    def score(h: Tensor) -> Tensor:
        return clip_text_score(hf_clip, h, mask, eos, targets)

    with torch.no_grad():  # the score from the cut is the whole HF text model's
        whole = cosine(features(hf_clip.get_text_features(input_ids=ids, attention_mask=keep)), targets)
        torch.testing.assert_close(score(hidden), whole, rtol=0, atol=1e-12)
    n_nodes = 8 if method == "integrated_gradients" else None
    expected = reference_ig(score, hidden, reference, n_nodes)
    ours = token_maps(attribution, method, batch, targets, ITEMS, ig_steps=n_nodes or 1)
    assert [len(v) for v in ours] == [int(e) + 1 for e in eos]  # BOS..EOS
    for b, values in enumerate(ours):
        assert np.abs(expected[b].numpy()).max() > 1e-4
        np.testing.assert_allclose(values, expected[b, : int(eos[b]) + 1].numpy(), rtol=1e-8, atol=1e-12)
        # causal attention: nothing after EOS reaches the pooled state, so the dropped positions carried 0
        assert float(expected[b, int(eos[b]) + 1 :].abs().sum()) == 0.0
    if method == "integrated_gradients":  # completeness over BOS..EOS with many nodes (see the image test)
        many = token_maps(attribution, method, batch, targets, ITEMS, ig_steps=128)
        with torch.no_grad():
            s_r = score(reference)
        for b, values in enumerate(many):
            assert values.sum() == pytest.approx(float(whole[b] - s_r[b]), abs=1e-10)


# --- 4, 5: MaskCLIP and Grad-ECLIP from the last layer's modules --------------------------------------------
@pytest.fixture(scope="module")
def clip_tied(model_dirs):
    """The tiny CLIP with its last vision layer changed so that every detail of the formulas shows: random biases
    on q, v and out_proj (the tiny model's are 0), and the key projection tied to the query projection, so that
    the CLS key after out_proj is the CLS query after out_proj: cosine 1, above every patch (a min-max scaling
    over all positions instead of the patches would then differ). Its own HF modules are the reference."""
    model = xclip.load_model(model_dirs["clip"], dtype="float64", device="cpu")
    attention = model.model.vision_model.encoder.layers[-1].self_attn
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for projection in (attention.q_proj, attention.v_proj, attention.out_proj):
            projection.bias.copy_(0.2 * torch.randn(projection.bias.shape, generator=generator, dtype=torch.float64))
        attention.k_proj.weight.copy_(attention.q_proj.weight)
        attention.k_proj.bias.copy_(attention.q_proj.bias)
    return model


def last_layer_setting(variant: str, clip, clip_tied, hf_clip, pixels):
    """(attribution, HF model of the reference, targets, hidden states entering the last vision layer)."""
    model, hf = (clip, hf_clip) if variant == "plain" else (clip_tied, clip_tied.model)
    targets = clip_text_targets(model, hf)
    hidden = clip_image_below(hf, pixels.pixel_values)
    with torch.no_grad():  # the reference's score is the whole HF model's
        whole = cosine(features(hf.get_image_features(pixel_values=pixels.pixel_values)), targets)
        torch.testing.assert_close(clip_image_score(hf, hidden, targets), whole, rtol=0, atol=1e-12)
    return xclip.InteractionAttribution(model), hf, targets, hidden


@pytest.mark.parametrize("variant", ["plain", "tied"])
def test_maskclip_equals_hand_written_reference(variant, clip, clip_tied, hf_clip, pixels):
    attribution, hf, targets, hidden = last_layer_setting(variant, clip, clip_tied, hf_clip, pixels)
    vision = hf.vision_model
    last = vision.encoder.layers[-1]
    with torch.no_grad():  # each position reads only its own value
        own = hidden + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden)))
        out = own + last.mlp(last.layer_norm2(own))
        embeddings = hf.visual_projection(vision.post_layernorm(out))  # (B, S, E): one per position
        expected = cosine(embeddings, targets[:, None])[:, 1:]
    ours = image_maps(attribution, "maskclip", targets, pixels, ITEMS)
    assert ours.shape == (2, 16) and expected.std() > 1e-4
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variant", ["plain", "tied"])
def test_grad_eclip_equals_hand_written_reference(variant, clip, clip_tied, hf_clip, pixels):
    attribution, hf, targets, hidden = last_layer_setting(variant, clip, clip_tied, hf_clip, pixels)
    last = hf.vision_model.encoder.layers[-1]
    attention = last.self_attn
    captured: dict[str, Tensor] = {}

    def before_out_proj(module, args):  # the heads' outputs, as HF's attention hands them to out_proj
        captured["o"] = args[0].detach().requires_grad_(True)
        return (captured["o"],)

    handle = attention.out_proj.register_forward_pre_hook(before_out_proj)
    try:
        score = clip_image_score(hf, hidden, targets)
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(score.sum(), captured["o"])
    with torch.no_grad():
        normed = last.layer_norm1(hidden)
        weights = gradient[:, 0]  # ds/do at the CLS row, (B, d)
        values = attention.v_proj(normed)  # (B, S, d)
        q_cls = attention.out_proj(attention.q_proj(normed[:, 0]))  # out_proj with its bias, as the authors' code
        keys = attention.out_proj(attention.k_proj(normed))
        expected = torch.zeros(2, 16, dtype=torch.float64)
        for b in range(2):
            closeness = torch.stack([cosine(q_cls[b], keys[b, j]) for j in range(17)])
            if variant == "tied":  # the CLS key is the CLS query: scaling over all positions would differ
                assert float(closeness[0]) > float(closeness[1:].max()) + 1e-3
            patches = closeness[1:]
            scaled = (patches - patches.min()) / (patches.max() - patches.min())  # min-max over the patches
            for j in range(16):
                expected[b, j] = max(0.0, float((weights[b] * values[b, j + 1]).sum() * scaled[j]))
    ours = image_maps(attribution, "grad_eclip", targets, pixels, ITEMS)
    assert expected.max() > 1e-6 and (expected == 0).any()  # the ReLU and the min-max scaling both bite
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-8, atol=1e-14)


# --- 6, 7: rollout and Chefer et al. from HF's own attention probabilities ----------------------------------
# HF's eager attention takes its softmax in float32 (then casts back), so the probabilities it returns carry
# float32 rounding (relative 6e-8 per entry); through two layers of products and sums that stays below 1e-6.
def test_rollout_from_hf_attentions(clip, hf_clip_eager, hf_clip, pixels):
    attribution = xclip.InteractionAttribution(clip)
    targets = clip_text_targets(clip, hf_clip)
    with torch.no_grad():
        attentions = hf_clip_eager.vision_model(pixel_values=pixels.pixel_values, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (2, 4, 17, 17)
    expected = []
    for b in range(2):
        relevance = torch.eye(17, dtype=torch.float64)
        for attention in attentions:  # A_L ... A_1, each head-averaged, plus identity, rows renormalised
            mixed = attention[b].mean(0) + torch.eye(17, dtype=torch.float64)
            mixed = mixed / mixed.sum(-1, keepdim=True)
            relevance = mixed @ relevance
        expected.append(relevance[0, 1:])
    expected = torch.stack(expected)
    ours = image_maps(attribution, "rollout", targets, pixels, ITEMS)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-12)


def test_chefer_from_hf_attentions_and_their_gradients(clip, hf_clip_eager, hf_clip, pixels):
    """The gradient is the score's total derivative by each layer's attention probabilities (Chefer et al.'s
    code: a hook on the probabilities, one backward pass), read from HF's eager attention."""
    attribution = xclip.InteractionAttribution(clip)
    targets = clip_text_targets(clip, hf_clip)
    with torch.enable_grad():
        out = hf_clip_eager.vision_model(pixel_values=pixels.pixel_values, output_attentions=True)
        score = cosine(hf_clip_eager.visual_projection(out.pooler_output), targets)
        gradients = torch.autograd.grad(score.sum(), out.attentions)
    expected = []
    for b in range(2):
        relevance = torch.eye(17, dtype=torch.float64)
        for attention, gradient in zip(out.attentions, gradients):
            relevance = relevance + (gradient[b] * attention[b].detach()).clamp_min(0).mean(0) @ relevance
        expected.append(relevance[0, 1:])
    expected = torch.stack(expected)
    ours = image_maps(attribution, "chefer", targets, pixels, ITEMS)
    assert expected.abs().max() > 1e-8
    scale = float(expected.abs().max())
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=1e-6 * scale)


# --- 8: the controls ---------------------------------------------------------------------------------------
def test_random_is_reproducible_per_item_and_differs_between_items(clip, pixels):
    attribution = xclip.InteractionAttribution(clip)
    targets = torch.zeros(2, clip.embedding_dim, dtype=torch.float64)
    first = image_maps(attribution, "random", targets, pixels, [3, 5], seed=7)
    again = image_maps(attribution, "random", targets, pixels, [3, 5], seed=7)
    swapped = image_maps(attribution, "random", targets, pixels, [5, 3], seed=7)
    reseeded = image_maps(attribution, "random", targets, pixels, [3, 5], seed=8)
    assert first.shape == (2, 16)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[::-1], swapped)  # a value belongs to its item, not to its row
    assert not np.allclose(first[0], first[1])
    assert not np.allclose(first, reseeded)
    assert 0.3 < first.std() < 3  # standard normal values
    batch = clip.tokenize(CAPTIONS)
    tokens = token_maps(attribution, "random", batch, targets, [3, 5], seed=7)
    assert [len(v) for v in tokens] == batch.n_positions
    np.testing.assert_array_equal(tokens[0], token_maps(attribution, "random", batch, targets, [3, 5], seed=7)[0])
    assert not np.allclose(tokens[0][:5], first[0][:5])  # the caption has a stream of its own


def test_centre_peaks_at_the_grid_centre(clip, pixels):
    attribution = xclip.InteractionAttribution(clip)
    targets = torch.zeros(2, clip.embedding_dim, dtype=torch.float64)
    values = image_maps(attribution, "centre", targets, pixels, ITEMS)
    assert values.shape == (2, 16)
    grid = values[0].reshape(4, 4)  # a 4 x 4 grid: the centre lies between patches (1, 1) .. (2, 2)
    centre = grid[1:3, 1:3]
    assert np.all(centre == grid.max()) and grid.max() > grid[0, 1] > grid[0, 0] == grid.min()
    np.testing.assert_array_equal(grid, grid[::-1, ::-1])  # symmetric about the centre
    np.testing.assert_array_equal(grid, grid.T)
    np.testing.assert_array_equal(values[0], values[1])


# --- 9: what each family may run ------------------------------------------------------------------------------
def test_siglip_refuses_the_pooled_methods_by_name(siglip, clip):
    for name in POOLED_METHODS:
        with pytest.raises(ConfigError, match=name):
            check_methods([name], siglip)
    with pytest.raises(ConfigError, match="rollout"):
        check_methods(["integrated_gradients", "rollout"], siglip)
    everything = check_methods(["all"], siglip)
    assert not set(everything) & {"maskclip", "grad_eclip", "rollout", "chefer"}
    assert set(everything) == set(FIRST_ORDER) - set(POOLED_METHODS)
    assert check_methods(["all"], clip) == FIRST_ORDER
    assert check_methods(["rollout", "random", "rollout"], clip) == ("rollout", "random")
    for unknown in ("lime", "Rollout", ""):
        with pytest.raises(ConfigError, match="unknown baseline"):
            check_methods([unknown], clip)


def test_image_maps_refuse_pooled_methods_on_siglip(siglip):
    """Called directly (not only behind check_methods), the maps refuse by name too, as the module promises."""
    attribution = xclip.InteractionAttribution(siglip)
    batch = siglip.preprocess(make_images(2))
    targets = torch.zeros(2, siglip.embedding_dim, dtype=torch.float64)
    with pytest.raises(ConfigError, match="unknown baseline"):
        image_maps(attribution, "lime", targets, batch, ITEMS)
    with pytest.raises(ConfigError, match="explains images only"):
        token_maps(attribution, "rollout", siglip.tokenize(CAPTIONS), targets, ITEMS)
    for name in POOLED_METHODS:
        with pytest.raises(ConfigError, match=name):
            image_maps(attribution, name, targets, batch, ITEMS)


# --- 10: SigLIP's attention-pooled image tower ---------------------------------------------------------------
def test_siglip_integrated_gradients_equal_reference_and_are_complete(siglip, hf_siglip):
    attribution = xclip.InteractionAttribution(siglip)
    batch = siglip.preprocess(make_images(2))
    vision = hf_siglip.vision_model
    ids = siglip.tokenizer(CAPTIONS, padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        targets = F.normalize(features(hf_siglip.get_text_features(input_ids=ids)), dim=-1)
        hidden = vision.embeddings(batch.pixel_values)
        reference = vision.embeddings(torch.zeros_like(batch.pixel_values[:1]))
        for layer in vision.encoder.layers[:-1]:
            hidden, reference = run_layer(layer, hidden, None), run_layer(layer, reference, None)
    cut = attribution.image_cut(batch)
    torch.testing.assert_close(cut.hidden, hidden, rtol=0, atol=1e-12)
    torch.testing.assert_close(cut.reference, reference, rtol=0, atol=1e-12)

    def score(h: Tensor) -> Tensor:  # last layer, post_layernorm, HF's attention-pooling head over all positions
        return cosine(vision.head(vision.post_layernorm(run_layer(vision.encoder.layers[-1], h, None))), targets)

    expected = reference_ig(score, hidden, reference, 8)
    ours = image_maps(attribution, "integrated_gradients", targets, batch, ITEMS, ig_steps=8)
    assert ours.shape == (2, 16) and np.abs(ours).max() > 1e-4
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-8, atol=1e-12)
    # completeness with 128 nodes (see the CLIP test: here 3e-10 at 16 nodes, 1e-16 from 32 on, every value at
    # least 4e-4): no prefix, so the patches carry the whole difference
    many = image_maps(attribution, "integrated_gradients", targets, batch, ITEMS, ig_steps=128)
    with torch.no_grad():
        s_h = cosine(features(hf_siglip.get_image_features(pixel_values=batch.pixel_values)), targets)
        s_r = cosine(features(hf_siglip.get_image_features(pixel_values=torch.zeros_like(batch.pixel_values))), targets)
    assert (s_h - s_r).abs().min() > 1e-3
    np.testing.assert_allclose(many.sum(-1), (s_h - s_r).numpy(), rtol=0, atol=1e-10)


# --- 11: the attention methods' block is the engine's -------------------------------------------------------
# Not a reference from HF's layers: rollout and Chefer et al. run each image block through
# block_forward_with_attention, which must stay block_forward itself, so that their maps explain the model the
# engine differentiates.
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layer_scale", [False, True])
def test_the_attention_methods_run_block_forward_and_read_its_softmax(masked, layer_scale):
    from torch import nn

    from xclip.core.transformer import Block, block_forward, block_forward_with_attention, pooled_block_forward

    generator = torch.Generator().manual_seed(0)
    width, n_heads, n_positions = 16, 4, 7

    def random(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def linear(n_in: int, n_out: int) -> nn.Linear:
        module = nn.Linear(n_in, n_out, dtype=torch.float64)
        module.weight.data, module.bias.data = random(n_out, n_in) / n_in**0.5, random(n_out)
        return module

    def layer_norm() -> nn.LayerNorm:
        module = nn.LayerNorm(width, dtype=torch.float64)
        module.weight.data, module.bias.data = 1 + 0.1 * random(width), 0.1 * random(width)
        return module

    gammas = (random(width), random(width))
    scales = {"ls1": lambda t: t * gammas[0], "ls2": lambda t: t * gammas[1]} if layer_scale else {}
    q_proj, k_proj, v_proj = linear(width, width), linear(width, width), linear(width, width)
    block = Block(ln1=layer_norm(), q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, out_proj=linear(width, width),
                  n_heads=n_heads, ln2=layer_norm(), fc1=linear(width, 4 * width), activation=F.gelu,
                  fc2=linear(4 * width, width), **scales)
    x = random(3, n_positions, width).requires_grad_(True)
    mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool))[None, None] if masked else None

    output, weights = block_forward_with_attention(block, x, mask)
    assert torch.equal(output, block_forward(block, x, mask))  # bit for bit
    torch.testing.assert_close(output, block_forward(block, x, mask, fused=True), rtol=1e-12, atol=1e-12)
    pooled = torch.tensor([6, 2, 4])
    torch.testing.assert_close(pooled_block_forward(block, x, mask, pooled), output[torch.arange(3), pooled],
                               rtol=1e-12, atol=1e-12)

    def heads(projection: nn.Linear) -> Tensor:  # (B, H, S, dh)
        return projection(block.ln1(x)).reshape(3, n_positions, n_heads, width // n_heads).transpose(1, 2)

    logits = heads(q_proj) @ heads(k_proj).transpose(-1, -2) / (width // n_heads) ** 0.5
    if masked:
        logits = logits.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(weights, torch.softmax(logits, dim=-1), rtol=1e-12, atol=1e-15)
    (gradient,) = torch.autograd.grad(output.sum(), weights)  # the weights stay in the graph, for Chefer et al.
    assert gradient.abs().max() > 0
