"""First-order attributions to set beside the second-order maps, computed on the same model and inputs.

Each method gives every image patch one number for a caption (or a phrase) and an image: how much the patch
matters to their similarity ``s = cos(t, g(h))``, with ``t`` the text's embedding and ``g`` the image encoder.
The gradient methods work where the engine does, on the hidden states entering the cut layer ``h`` and their
reference ``r`` (the run's settings: same layer, same reference image, same patch grid). The attention methods
read the whole image tower. ``S`` stands for every position of the image tower, ``p`` for its pooled position
(CLIP's class token), patches are the positions after the prefix.

- ``integrated_gradients`` (Sundararajan et al., ICML 2017): ``IG_j = (h - r)_j . mean_a grad s(r + a (h - r))_j``
  over Gauss-Legendre nodes ``a``; the patches' and the prefix's values add up to ``s(h) - s(r)``.
- ``gradient_input``: ``grad s(h)_j . (h - r)_j`` (Shrikumar et al., 2016, with the reference as the baseline):
  the first-order Taylor term of the same difference.
- ``maskclip`` (Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP"): the last block's attention is
  replaced by each position reading its own value, so every patch gets an embedding of its own, ``e_j =
  readout(MLP-residual(x_j + out_proj(v_j)))``; the map is ``cos(e_j, t)``.
- ``grad_eclip`` (Zhao et al., ICML 2024, "Gradient-based Visual Explanation for Transformer-based CLIP"): in
  the last block, ``ReLU(sum_c w_c v_jc lambda_j)`` with ``w = ds/do_p`` the gradient at the pooled position's
  attention output (before the output projection), ``v_j`` the values and ``lambda_j`` the cosine of the
  pooled query and key ``j`` after the output projection, min-max scaled over the patches (the authors' code).
- ``rollout`` (Abnar and Zuidema, ACL 2020): the product over blocks of the head-averaged attention plus the
  identity, rows renormalised, read at the pooled row.
- ``chefer`` (Chefer et al., ICCV 2021, "Generic Attention-model Explainability"): ``R = I``, then per block
  ``R += mean_h ReLU(dA/ds * A) R``, read at the pooled row.
- ``random``: standard normal values from a seed and the item's index (a control: it knows nothing).
- ``centre``: a Gaussian bump at the grid's centre, its spread a quarter of the grid's side (a control:
  objects are often central).

``integrated_gradients``, ``gradient_input`` and ``random`` also give each caption position a value (the same
formulas with the text tower's states and the image's embedding as ``t``); the others explain images only.
The attention methods and MaskCLIP need an image tower read at one pooled position: a SigLIP image tower,
which pools every position through an attention head, refuses them by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.models.base import DualEncoderAdapter, ImageBatch, TextBatch
from xclip.attribution.engine import CutStates, InteractionAttribution
from xclip.core.quadrature import quadrature
from xclip.core.transformer import attention, block_forward_with_attention, embed_from_hidden
from xclip.errors import ConfigError

FIRST_ORDER: tuple[str, ...] = (
    "integrated_gradients", "gradient_input", "maskclip", "grad_eclip", "rollout", "chefer", "random", "centre",
)
TOKEN_METHODS: tuple[str, ...] = ("integrated_gradients", "gradient_input", "random")
POOLED_METHODS: tuple[str, ...] = ("maskclip", "grad_eclip", "rollout", "chefer")  # need a pooled image position
DEFAULT_IG_STEPS = 32


def check_methods(names: Sequence[str], model: DualEncoderAdapter) -> tuple[str, ...]:
    """The first-order methods named (``all``: every one the model supports), or a :class:`ConfigError` naming
    an unknown method or one the model's family cannot run, and why."""
    names = list(dict.fromkeys(names))
    has_pooled_image = model.image_pooled_index(1) is not None
    if names == ["all"]:
        return tuple(name for name in FIRST_ORDER if has_pooled_image or name not in POOLED_METHODS)
    for name in names:
        if name not in FIRST_ORDER:
            msg = f"unknown baseline {name!r}; choose from {', '.join(FIRST_ORDER)} (or all)"
            raise ConfigError(msg)
        if name in POOLED_METHODS and not has_pooled_image:
            msg = (f"baseline {name!r} reads the image tower at one pooled position (a class token); "
                   f"{model.name or 'this model'} pools every position through an attention head (SigLIP), so it cannot run {name}")
            raise ConfigError(msg)
    return tuple(names)


def image_maps(
    attribution: InteractionAttribution,
    method: str,
    targets: Tensor,
    images: ImageBatch,
    items: Sequence[int],
    *,
    ig_steps: int = DEFAULT_IG_STEPS,
    seed: int = 0,
) -> np.ndarray:
    """``(B, n_patches)`` patch values of ``method`` for ``images[b]`` against the normalised text embedding
    ``targets[b]``; ``items[b]`` seeds the random control (the same item always gets the same values)."""
    model = attribution.model
    check_methods([method], model)
    n_prefix = model.n_image_prefix
    if method in ("integrated_gradients", "gradient_input"):
        cut = attribution.image_cut(images)
        values = _path_gradients(cut, targets, ig_steps if method == "integrated_gradients" else None)
    elif method == "maskclip":
        values = _maskclip(model, targets, images.pixel_values)
    elif method == "grad_eclip":
        values = _grad_eclip(model, targets, images.pixel_values)
    elif method in ("rollout", "chefer"):
        values = _attention_relevance(model, targets, images.pixel_values, weigh_by_gradient=method == "chefer")
    elif method == "random":
        return np.stack([_random(seed, item, model.patch_grid[0] * model.patch_grid[1]) for item in items])
    elif method == "centre":
        rows, columns = model.patch_grid
        r, c = np.mgrid[0:rows, 0:columns]
        spread = max(rows, columns) / 4
        centre = np.exp(-((r - (rows - 1) / 2) ** 2 + (c - (columns - 1) / 2) ** 2) / (2 * spread**2)).ravel()
        return np.repeat(centre[None], len(items), axis=0)
    else:
        raise AssertionError(method)  # check_methods knows every method
    return values[:, n_prefix:].double().cpu().numpy()


def token_maps(
    attribution: InteractionAttribution,
    method: str,
    captions: TextBatch,
    targets: Tensor,
    items: Sequence[int],
    *,
    ig_steps: int = DEFAULT_IG_STEPS,
    seed: int = 0,
) -> list[np.ndarray]:
    """Per caption ``b`` the values of its ``captions.n_positions[b]`` positions against the normalised image
    embedding ``targets[b]`` (methods in :data:`TOKEN_METHODS`)."""
    if method == "random":
        return [_random(seed, item, n, stream=1) for item, n in zip(items, captions.n_positions)]
    if method not in ("integrated_gradients", "gradient_input"):
        msg = f"baseline {method!r} explains images only; caption tokens have {', '.join(TOKEN_METHODS)}"
        raise ConfigError(msg)
    cut = attribution.text_cut(captions)
    values = _path_gradients(cut, targets, ig_steps if method == "integrated_gradients" else None).double().cpu().numpy()
    return [values[b, :n] for b, n in enumerate(captions.n_positions)]


def _random(seed: int, item: int, n: int, stream: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, stream, item]).standard_normal(n)


def _similarity(cut: CutStates, hidden: Tensor, targets: Tensor) -> Tensor:
    """``(B,)`` cosine of each input's embedding with its target."""
    return (embed_from_hidden(cut.upper, hidden, cut.positions, normalize=True) * targets).sum(-1)


def _path_gradients(cut: CutStates, targets: Tensor, n_steps: int | None) -> Tensor:
    """``(B, S)``: integrated gradients over ``n_steps`` Gauss-Legendre nodes, or (None) gradient x input,
    both of the similarity with ``targets`` at the cut, against the reference."""
    hidden = cut.hidden
    reference = cut.reference.expand_as(hidden)
    delta = hidden - reference
    targets = targets.to(hidden.dtype)
    if n_steps is None:
        alphas, weights = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    else:
        alphas, weights = quadrature("gauss-legendre", n_steps)
    average = torch.zeros_like(hidden)
    for alpha, weight in zip(alphas.tolist(), weights.tolist()):
        with torch.enable_grad():
            point = (reference + alpha * delta).detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(_similarity(cut, point, targets).sum(), point)
        average += weight * gradient
    return (average * delta).sum(-1)


def _image_readout(model: DualEncoderAdapter, final: Tensor, targets: Tensor) -> Tensor:
    """``(B,)`` cosine of the pooled readout of the image tower's output ``final`` with ``targets``."""
    pooled_index = model.image_pooled_index(final.shape[0])
    upper = model.image_upper(len(model.image_blocks) - 1)
    assert pooled_index is not None and upper.pooled_readout is not None
    pooled = final[torch.arange(final.shape[0], device=final.device), pooled_index]
    return (F.normalize(upper.pooled_readout(pooled), dim=-1) * targets.to(final.dtype)).sum(-1)


def _last_block_input(model: DualEncoderAdapter, pixel_values: Tensor) -> Tensor:
    return model.image_hidden(pixel_values, len(model.image_blocks) - 1)


def _maskclip(model: DualEncoderAdapter, targets: Tensor, pixel_values: Tensor) -> Tensor:
    block = model.image_blocks[-1]
    upper = model.image_upper(len(model.image_blocks) - 1)
    assert upper.pooled_readout is not None
    with torch.no_grad():
        x = _last_block_input(model, pixel_values)
        own_values = block.split_heads(block.v_proj(block.ln1(x)))  # what each head attends to: its own value
        embeddings = F.normalize(upper.pooled_readout(block.output_from_heads(x, own_values)), dim=-1)  # (B, S, E)
        return torch.einsum("bse,be->bs", embeddings, targets.to(embeddings.dtype))


def _grad_eclip(model: DualEncoderAdapter, targets: Tensor, pixel_values: Tensor) -> Tensor:
    block = model.image_blocks[-1]
    x = _last_block_input(model, pixel_values)
    n_images = x.shape[0]
    rows = torch.arange(n_images, device=x.device)
    pooled = model.image_pooled_index(n_images)
    assert pooled is not None
    with torch.enable_grad():
        normed = block.ln1(x)
        attended = attention(*block.queries_keys_values(normed), None)
        attended = attended.detach().requires_grad_(True)  # (B, H, S, dh): the heads' outputs before out_proj
        final = block.output_from_heads(x, attended)
        (gradient,) = torch.autograd.grad(_image_readout(model, final, targets).sum(), attended)
    with torch.no_grad():
        weights = gradient.transpose(-3, -2).flatten(-2)[rows, pooled]  # (B, d): the heads merged
        values = block.v_proj(normed)  # (B, S, d)
        query = block.out_proj(block.q_proj(normed[rows, pooled]))  # (B, d)
        keys = block.out_proj(block.k_proj(normed))  # (B, S, d)
        closeness = torch.einsum("bd,bsd->bs", F.normalize(query, dim=-1), F.normalize(keys, dim=-1))
        patches = closeness[:, model.n_image_prefix :]
        low, high = patches.min(-1, keepdim=True).values, patches.max(-1, keepdim=True).values
        loosened = (closeness - low) / (high - low).clamp_min(torch.finfo(closeness.dtype).tiny)
        return torch.relu(torch.einsum("bd,bsd->bs", weights, values) * loosened)


def _attention_relevance(model: DualEncoderAdapter, targets: Tensor, pixel_values: Tensor, *, weigh_by_gradient: bool) -> Tensor:
    """Rollout, or (``weigh_by_gradient``) Chefer et al.'s relevance, read at the pooled row: ``(B, S)``."""
    # the attention maps stay inside one graph, so that each block's gradient counts every path through the
    # blocks above it (their attention maps included), as Chefer et al.'s single backward pass does
    x = model.image_hidden(pixel_values, 0).requires_grad_(weigh_by_gradient)
    attentions = []
    with torch.enable_grad():
        for block in model.image_blocks:
            x, weights = block_forward_with_attention(block, x, None)
            attentions.append(weights)
        gradients = (
            torch.autograd.grad(_image_readout(model, x, targets).sum(), attentions) if weigh_by_gradient else None
        )
    with torch.no_grad():
        n_images, _, n_positions, _ = attentions[0].shape
        identity = torch.eye(n_positions, dtype=x.dtype, device=x.device).expand(n_images, -1, -1)
        relevance = identity.clone()
        for index, weights in enumerate(attentions):
            if gradients is None:
                mixed = weights.mean(1) + identity
                relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
            else:
                relevance = relevance + torch.relu(gradients[index] * weights).mean(1) @ relevance
        pooled = model.image_pooled_index(n_images)
        assert pooled is not None
        return relevance[torch.arange(n_images, device=x.device), pooled]


def text_embeddings(model: DualEncoderAdapter, texts: Sequence[str]) -> Tensor:
    """Normalised embeddings of texts encoded as captions of their own (a phrase alone, say)."""
    return model.embed_text(model.tokenize(list(texts)))

