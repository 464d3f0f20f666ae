"""What transformers' dual encoders share: their layer layout, and their tokenizer and image processor
behind the family contract (token ids with character spans; pixels with their geometry)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from xclip.models.base import DualEncoderAdapter, EncodedCaptions
from xclip.core.transformer import Block
from xclip.errors import ModelFamilyError
from xclip.core.geometry import Preprocessing


def hf_block(layer: nn.Module) -> Block:
    """A :class:`Block` view of an HF CLIP/SigLIP encoder layer (same attribute names in both families)."""
    attn = layer.self_attn
    return Block(
        ln1=layer.layer_norm1,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        out_proj=attn.out_proj,
        n_heads=attn.num_heads,
        ln2=layer.layer_norm2,
        fc1=layer.mlp.fc1,
        activation=layer.mlp.activation_fn,
        fc2=layer.mlp.fc2,
    )


def from_pretrained(source: str, dtype: torch.dtype, check_family: Callable[[str], object], **options: Any,
                    ) -> tuple[str, nn.Module, Any]:
    """``(model_type, model, processor)`` of a transformers checkpoint. ``check_family(model_type)`` runs before
    the weights load, so that an unknown family is named first. Raises what ``from_pretrained`` raises."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    model_type = AutoConfig.from_pretrained(source, **options).model_type
    check_family(model_type)
    return model_type, AutoModel.from_pretrained(source, dtype=dtype, **options), AutoProcessor.from_pretrained(source, **options)


class HFDualEncoder(DualEncoderAdapter):
    """A transformers dual encoder with its ``AutoProcessor`` (a fast tokenizer, which gives character
    offsets, and an image processor that resizes by the short side or to a fixed size, then may crop)."""

    padding: str | bool = True  # how the family pads a batch of captions (SigLIP: to the full context)

    def __init__(self, model: nn.Module, processor: Any, *, name: str = "", revision: str | None = None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        if not getattr(self.tokenizer, "is_fast", False):
            msg = f"not supported: the slow tokenizer {type(self.tokenizer).__name__} (xclip needs a fast tokenizer's character offsets)"
            raise ModelFamilyError(msg)
        super().__init__(model, name=name, revision=revision)
        self.bos_token_id = self.tokenizer.bos_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        self.vocabulary_size = len(self.tokenizer)
        self.image_mean = tuple(self.image_processor.image_mean)
        self.image_std = tuple(self.image_processor.image_std)
        self._resize, self._crop = _hf_resize_and_crop(self.image_processor)
        # the fast (torchvision) processors round a centre crop's offsets, the others floor them
        self._rounds_crop = type(self.image_processor).__name__.endswith("Fast")

    def _block(self, layer: nn.Module) -> Block:
        return hf_block(layer)

    @property
    def max_text_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def patch_grid(self) -> tuple[int, int]:
        config = self.model.config.vision_config
        side = config.image_size // config.patch_size
        return side, side

    def _encode_captions(self, captions: list[str]) -> EncodedCaptions:
        # a caption's text is text: "<|endoftext|> a dog" is tokenised as the characters it holds, never cut at
        # a special token it spells (the tokenizer's special tokens are only the ones it adds)
        encoded = self.tokenizer(
            captions, padding=self.padding, truncation=True, max_length=self.max_text_positions, return_tensors="pt",
            return_offsets_mapping=True, return_special_tokens_mask=True, split_special_tokens=True,
        )
        # verbose=False: the untruncated ids only measure where the cut falls; the tokenizer's warning that such a
        # sequence "will result in indexing errors" would contradict the truncation the model is given
        untruncated = self.tokenizer(captions, truncation=False, split_special_tokens=True, verbose=False)["input_ids"]
        input_ids = encoded["input_ids"]
        special = encoded["special_tokens_mask"].bool()
        unknown = self.tokenizer.unk_token_id  # CLIP's tokenizer names EOS its unknown token: only content counts
        return EncodedCaptions(
            input_ids=input_ids,
            attention_mask=self._attention_mask(encoded["attention_mask"]),
            offsets=[[(int(a), int(b)) for a, b in row] for row in encoded["offset_mapping"].tolist()],
            special=special,
            unknown=(input_ids == unknown) & ~special if unknown is not None else torch.zeros_like(special),
            is_truncated=[len(ids) > input_ids.shape[1] for ids in untruncated],
        )

    def _attention_mask(self, mask: Tensor) -> Tensor:
        return mask

    def _token_strings(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def _preprocess_image(self, image: Image.Image) -> tuple[Tensor, Preprocessing]:
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        width, height = image.size
        if self._resize is None:
            resized = (width, height)
        elif "shortest_edge" in self._resize:  # transformers' rule: the long side is truncated, not rounded
            short, long = sorted((width, height))
            new_short, new_long = self._resize["shortest_edge"], int(self._resize["shortest_edge"] * long / short)
            resized = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            resized = (self._resize["width"], self._resize["height"])
        input_size = (int(pixels.shape[2]), int(pixels.shape[1]))
        origin = (0, 0)
        if self._crop is not None:
            margins = (resized[0] - input_size[0], resized[1] - input_size[1])
            origin = tuple(int(round(m / 2)) if self._rounds_crop else m // 2 for m in margins)
        return pixels, Preprocessing.resize_then_crop((width, height), resized, origin, input_size, self.patch_grid)


def _hf_resize_and_crop(processor: Any) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """The image processor's resize (``shortest_edge``, or ``height`` and ``width``) and centre crop, as plain
    dicts; other resize rules are refused by name, since xclip could not say where the patches lie."""
    def keys(value: Any) -> dict[str, int]:
        items = value.items() if hasattr(value, "items") else vars(value).items()
        return {k: int(v) for k, v in items if v is not None}

    resize = keys(processor.size) if getattr(processor, "do_resize", True) else None
    crop = keys(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
    if resize is not None and set(resize) not in ({"shortest_edge"}, {"height", "width"}):
        msg = f"not supported: image processor size {resize} (shortest_edge, or height and width, are)"
        raise ModelFamilyError(msg)
    return resize, crop


def shape_mismatches(directory: Path) -> list[str]:
    """``name is [shape] in file.safetensors, [shape] in config.json`` for each tensor whose shape differs from
    the model that config.json describes (built on the meta device, without memory); empty where that cannot be
    told (.bin weights, a config transformers cannot build)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
        expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
        found = []
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as opened:
                for name in opened.keys():
                    shape = list(opened.get_slice(name).get_shape())
                    if name in expected and expected[name] != shape:
                        found.append(f"{name} is {shape} in {file.name}, {expected[name]} in config.json")
    except Exception:  # only a detail of the message: the error itself is reported either way
        return []
    return found
