"""The open_clip family: open_clip's own ``CLIP`` and ``CustomTextCLIP`` with a ViT image tower and a
transformer text tower, loaded and preprocessed by open_clip itself (its tokenizer, its transforms).

Its blocks differ from transformers' in layout only, which :func:`open_clip_block` translates exactly: the
packed ``in_proj`` of ``nn.MultiheadAttention`` is split into q/k/v projections (views, no copy), LayerScale
becomes the block's branch scales, ``ln_pre`` belongs to the image embeddings, and the readouts are
``ln_post``/``ln_final`` then the projection matrix, pooled at CLS (``tok``), over the patches (``avg``) or at
EOT (text ``argmax``/``eos``/``last``/``first``). What the common checkpoints do not use is refused with
``not supported: <feature>`` (:func:`check_supported`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from PIL import Image

from xclip.models.base import DualEncoderAdapter, EncodedCaptions
from xclip.core.transformer import Block, Positions, UpperEncoder
from xclip.errors import ModelFamilyError
from xclip.core.geometry import Preprocessing


def create_open_clip(model_name: str, pretrained: str | None) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """``(model, tokenizer, transform, preprocessing config)`` as open_clip builds them, weights read with
    ``weights_only=True``; raises what open_clip raises."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, weights_only=True)
    return model.eval(), open_clip.get_tokenizer(model_name), transform, open_clip.get_model_preprocess_cfg(model)


def _towers(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(image tower, text tower) of an open_clip model: ``CLIP`` keeps its text tower's parts on itself,
    ``CustomTextCLIP`` in ``model.text``."""
    return model.visual, getattr(model, "text", model)


def _text_pool(text: nn.Module) -> str:
    """How the text tower pools (``CLIP`` keeps it as ``text_pool_type``, ``TextTransformer`` as ``pool_type``)."""
    return getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ModelFamilyError` naming the first feature of ``model`` that this family does not cover."""
    problem = next(_unsupported_features(model), None)
    if problem is not None:
        msg = f"not supported: {problem}"
        raise ModelFamilyError(msg)


def _unsupported_features(model: nn.Module) -> Iterator[str]:
    from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer

    visual, text = _towers(model)
    if not isinstance(visual, VisionTransformer):
        yield f"image tower {type(visual).__name__} (timm and ResNet towers; only open_clip's VisionTransformer is)"
    elif visual.attn_pool is not None:
        yield "attentional pooling of the image tower (CoCa)"
    elif visual.pool_type not in ("tok", "avg"):
        yield f"image pooling {visual.pool_type!r}"
    if text is not model and not isinstance(text, TextTransformer):
        yield f"text tower {type(text).__name__} (HF text towers; only open_clip's TextTransformer is)"
    elif getattr(text, "cls_emb", None) is not None:
        yield "a text CLS token appended to the caption (CoCa)"
    elif text.attn_mask is None:
        yield "a bidirectional text tower (no causal mask)"
    if _text_pool(text) not in ("argmax", "eos", "first", "last"):
        yield f"text pooling {_text_pool(text)!r}"
    projection = getattr(text, "text_projection", None)
    if isinstance(projection, nn.Linear) and projection.bias is not None:
        yield "a text projection with a bias"
    for name, tower in (("image", visual), ("text", text)):
        blocks = getattr(getattr(tower, "transformer", None), "resblocks", [])
        if any(getattr(scale, "inplace", False) for block in blocks for scale in (block.ls_1, block.ls_2)):
            yield f"in-place LayerScale in the {name} tower"
        kinds = {type(block).__name__ for block in blocks if not isinstance(block, ResidualAttentionBlock)}
        if kinds:
            yield f"{name} blocks of type {', '.join(sorted(kinds))} (qk-norm, scaled cosine attention, scaled heads)"


def open_clip_block(block: nn.Module) -> Block:
    """A :class:`Block` view of an open_clip ``ResidualAttentionBlock`` (its weights shared, not copied)."""
    attention = block.attn
    width = attention.embed_dim
    projections = []
    for k in range(3):  # in_proj packs the q, k and v projections row-wise
        projection = nn.Linear(width, width, bias=attention.in_proj_bias is not None)
        projection.weight = nn.Parameter(attention.in_proj_weight[k * width : (k + 1) * width], requires_grad=False)
        if attention.in_proj_bias is not None:
            projection.bias = nn.Parameter(attention.in_proj_bias[k * width : (k + 1) * width], requires_grad=False)
        projections.append(projection)
    return Block(
        ln1=block.ln_1, q_proj=projections[0], k_proj=projections[1], v_proj=projections[2],
        out_proj=attention.out_proj, n_heads=attention.num_heads, ln2=block.ln_2, fc1=block.mlp.c_fc,
        activation=block.mlp.gelu, fc2=block.mlp.c_proj, ls1=block.ls_1, ls2=block.ls_2,
    )


class _Project(nn.Module):
    """``x @ projection``: open_clip keeps its projections as bare matrices."""

    def __init__(self, projection: Tensor | nn.Module | None) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        if self.projection is None:
            return x
        return self.projection(x) if isinstance(self.projection, nn.Module) else x @ self.projection


class OpenClipAdapter(DualEncoderAdapter):
    """open_clip's model with its own tokenizer (CLIP's byte-level BPE) and image transform."""

    family = "open_clip"
    n_image_prefix = 1  # open_clip's ViT always has a class token; `avg` pooling reads past it

    def __init__(self, model: nn.Module, tokenizer: Any, transform: Any, preprocess_config: dict[str, Any], *,
                 name: str = "", revision: str | None = None) -> None:
        check_supported(model)
        self.visual, self.text = _towers(model)
        self._tokenizer, self._transform = tokenizer, transform
        self._decoder = getattr(tokenizer, "decoder", None)
        if self._decoder is None:
            msg = f"not supported: the tokenizer {type(tokenizer).__name__} (only open_clip's CLIP BPE tokenizer is)"
            raise ModelFamilyError(msg)
        self._context_length = int(getattr(model, "context_length", getattr(self.text, "context_length", 77)))
        self.bos_token_id = int(tokenizer.sot_token_id)
        self.eos_token_id = int(tokenizer.eot_token_id)
        self.pad_token_id = self.eos_token_id  # the reference captions' filler, as in transformers' CLIP
        self.vocabulary_size = len(self._decoder)
        self.image_mean = tuple(preprocess_config.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.image_std = tuple(preprocess_config.get("std", (0.26862954, 0.26130258, 0.27577711)))
        size = preprocess_config.get("size", 224)
        self._input_size = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))  # (width, height)
        self._resize_mode = preprocess_config.get("resize_mode", "shortest")
        if self._resize_mode not in ("shortest", "squash"):
            msg = f"not supported: image resize mode {self._resize_mode!r} (shortest and squash are)"
            raise ModelFamilyError(msg)
        if self._resize_mode == "shortest" and self._input_size[0] != self._input_size[1]:
            msg = f"not supported: a non-square input {self._input_size} with resize mode 'shortest'"
            raise ModelFamilyError(msg)
        super().__init__(model, name=name, revision=revision)

    def library_versions(self) -> dict[str, str]:
        import open_clip

        return {"open_clip_version": open_clip.__version__}

    def _encode_captions(self, captions: list[str]) -> EncodedCaptions:
        tokenizer = _text_only_tokenizer(self._tokenizer, captions)
        ids = tokenizer(captions, context_length=self._context_length)  # SOT ... EOT, zero padding
        # causal attention: positions after the last EOT cannot change any pooled state, so they are dropped
        length = int(self.pooled_index(ids).max()) + 1
        ids = ids[:, :length]
        eot = self.pooled_index(ids)
        index = torch.arange(length)
        special = (index[None, :] == 0) | (index[None, :] >= eot[:, None])
        contents = [tokenizer.encode(caption) for caption in captions]
        offsets = [
            [(0, 0), *_aligned_offsets(caption, [self._token_text(i) for i in row[1 : int(end)]]), *[(0, 0)] * (length - int(end))]
            for caption, row, end in zip(captions, ids.tolist(), eot)
        ]
        return EncodedCaptions(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            offsets=offsets,
            special=special,
            unknown=torch.zeros_like(ids, dtype=torch.bool),  # byte-level BPE: every word has tokens
            is_truncated=[len(content) + 2 > self._context_length for content in contents],
        )

    def _token_text(self, token_id: int) -> str:
        """A BPE token as the text it encodes (its bytes decoded, the end-of-word mark dropped)."""
        decoded = bytearray(self._tokenizer.byte_decoder[c] for c in self._decoder[token_id])
        return decoded.decode("utf-8", errors="ignore").replace("</w>", "")

    def _token_strings(self, ids: list[int]) -> list[str]:
        return [self._decoder[int(i)] for i in ids]

    def _preprocess_image(self, image: Image.Image) -> tuple[Tensor, Preprocessing]:
        pixels = self._transform(image)
        width, height = image.size
        if self._resize_mode == "squash":
            resized, origin = self._input_size, (0, 0)
        else:  # torchvision's Resize(int): the long side truncated; CenterCrop: offsets rounded
            side = self._input_size[0]
            short, long = sorted((width, height))
            resized = (side, int(side * long / short)) if width <= height else (int(side * long / short), side)
            origin = (int(round((resized[0] - side) / 2.0)), int(round((resized[1] - side) / 2.0)))
        return pixels, Preprocessing.resize_then_crop((width, height), resized, origin, self._input_size, self.patch_grid)

    def _block(self, layer: nn.Module) -> Block:
        return open_clip_block(layer)

    def _text_layers(self) -> Sequence[nn.Module]:
        return self.text.transformer.resblocks

    def _image_layers(self) -> Sequence[nn.Module]:
        return self.visual.transformer.resblocks

    @property
    def embedding_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def max_text_positions(self) -> int:
        return self._context_length

    @property
    def patch_grid(self) -> tuple[int, int]:
        rows, cols = self.visual.grid_size
        return int(rows), int(cols)

    def pooled_index(self, input_ids: Tensor) -> Tensor:
        pool = _text_pool(self.text)
        if pool == "first":
            return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if pool == "last":
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
        if pool == "eos":
            eos = getattr(self.text, "text_eos_id", getattr(self.text, "eos_id", self.eos_token_id))
            return (input_ids == eos).int().argmax(dim=-1)
        return input_ids.argmax(dim=-1)  # argmax: EOT is the largest id of CLIP's vocabulary

    def _text_positions(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Positions, Tensor, list[int]]:
        n_tokens = input_ids.shape[1]
        causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None].expand(input_ids.shape[0], 1, n_tokens, n_tokens)
        eos_index = self.pooled_index(input_ids)
        return Positions(mask=mask, pooled_index=eos_index), eos_index, (eos_index + 1).tolist()

    def _text_embeddings(self, input_ids: Tensor) -> Tensor:
        text = self.text
        return text.token_embedding(input_ids) + text.positional_embedding[: input_ids.shape[1]]

    def _image_embeddings(self, pixel_values: Tensor) -> Tensor:
        visual = self.visual
        x = visual.conv1(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, width)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))

    def text_upper(self, layer: int) -> UpperEncoder:
        readout = nn.Sequential(self.text.ln_final, _Project(self.text.text_projection))
        return UpperEncoder(blocks=self.text_blocks[layer:], pooled_readout=readout)

    def image_upper(self, layer: int) -> UpperEncoder:
        visual = self.visual
        projection = _Project(visual.proj)
        if visual.pool_type == "tok":
            return UpperEncoder(blocks=self.image_blocks[layer:], pooled_readout=nn.Sequential(visual.ln_post, projection))
        # avg: the mean of the patch positions, normalised before or after pooling as the model was built
        if visual.final_ln_after_pool:
            readout = nn.Sequential(_PatchMean(), visual.ln_post, projection)
        else:
            readout = nn.Sequential(visual.ln_post, _PatchMean(), projection)
        return UpperEncoder(blocks=self.image_blocks[layer:], readout=readout)

    def image_pooled_index(self, n_images: int) -> Tensor | None:
        if self.visual.pool_type == "avg":
            return None
        return torch.zeros(n_images, dtype=torch.long, device=self.device)


class _PatchMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 1:].mean(dim=1)


def _aligned_offsets(caption: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Character spans of BPE pieces in the caption they came from, found in order. open_clip's tokenizer
    lowercases and cleans the text first, so a piece is searched case-insensitively from the end of the
    previous one; a piece that is not found (text the cleaning changed, a byte of a split character) gets
    ``(0, 0)`` and is shown by its token string."""
    lowered = caption.lower()
    text = lowered if len(lowered) == len(caption) else caption
    spans, cursor = [], 0
    for piece in pieces:
        start = text.find(piece.lower(), cursor) if piece.strip() else -1
        if start < 0:
            spans.append((0, 0))
            continue
        spans.append((start, start + len(piece)))
        cursor = start + len(piece)
    return spans


def _text_only_tokenizer(tokenizer: Any, captions: list[str]) -> Any:
    """open_clip's tokenizer reading a caption's special strings (``<end_of_text>``) as text. Its pattern
    matches its special tokens first, case-insensitively, so a caption spelling one would be cut there (a
    second EOT); this is a shallow copy whose pattern lacks them, sharing the BPE tables. Where the pattern is
    not built that way, a caption holding a special string is refused with :class:`InputError`."""
    import copy

    import regex

    from xclip.errors import InputError

    specials = [str(tokenizer.decoder[i]) for i in getattr(tokenizer, "all_special_ids", [])]
    pattern = getattr(tokenizer, "pat", None)
    prefix = "|".join(specials) + "|"
    if specials and isinstance(pattern, regex.Pattern) and pattern.pattern.startswith(prefix):
        text_only = copy.copy(tokenizer)
        text_only.pat = regex.compile(pattern.pattern.removeprefix(prefix), pattern.flags)
        return text_only
    for i, caption in enumerate(captions):
        found = next((s for s in specials if s.lower() in caption.lower()), None)
        if found is not None:
            where = f"caption {i}" if len(captions) > 1 else "the caption"
            msg = f"{where} holds {found!r}, a special token of the tokenizer, which xclip cannot read as text: remove it"
            raise InputError(msg)
    return tokenizer
