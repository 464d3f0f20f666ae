"""Randomly initialised CLIP and SigLIP checkpoints of real (or tiny) architectures, built offline.

Benchmarks and tests use them: the cost of attribution does not depend on the weights, and a model saved with
``save_pretrained`` loads through exactly the path a hub checkpoint takes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

# (vision width, layers, heads, image size, patch), (text width, layers, heads), projection
ARCHITECTURES: dict[str, tuple[tuple[int, int, int, int, int], tuple[int, int, int], int]] = {
    "tiny": ((32, 2, 4, 32, 8), (32, 2, 4), 16),
    "vit-b-32": ((768, 12, 12, 224, 32), (512, 12, 8), 512),
    "vit-b-16": ((768, 12, 12, 224, 16), (512, 12, 8), 512),
    "vit-l-14": ((1024, 24, 16, 224, 14), (768, 12, 12), 768),
    "siglip-base": ((768, 12, 12, 224, 16), (768, 12, 12), 768),
}
_WORDS = "a an the photo of dog cat red blue green circle square two and on next to with".split()


def _clip_tokenizer() -> Any:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in sorted(ByteLevel.alphabet()):
            vocab[char + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:  # whole-word merges so that common words are single tokens
        piece = word[0]
        for i, char in enumerate(word[1:], start=1):
            nxt = char + ("</w>" if i == len(word) - 1 else "")
            merges.append((piece, nxt))
            piece += nxt
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _word_tokenizer(max_length: int) -> Any:
    """A word-level tokenizer with SigLIP's conventions: no BOS, ``</s>`` as EOS and pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _scale_weights(model: Any, factor: float) -> Any:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:  # matrices, embeddings and convolutions; not norms or biases
                parameter.mul_(factor)
    return model


def build_random_model(
    family: str,
    architecture: str = "tiny",
    *,
    seed: int = 0,
    initializer_factor: float = 1.0,
    image_size: int | None = None,
) -> tuple[Any, Any]:
    """``(model, processor)`` with random weights; ``family`` is ``clip`` or ``siglip``.

    ``initializer_factor`` scales the initial weights (smaller = a smoother, more nearly linear model);
    ``image_size`` overrides the architecture's input resolution (more patches).
    """
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    (v_width, v_layers, v_heads, image_size_default, patch), (t_width, t_layers, t_heads), projection = ARCHITECTURES[
        architecture
    ]
    image_size = image_size or image_size_default
    torch.manual_seed(seed)
    vision = {
        "hidden_size": v_width,
        "intermediate_size": 4 * v_width,
        "num_hidden_layers": v_layers,
        "num_attention_heads": v_heads,
        "image_size": image_size,
        "patch_size": patch,
    }
    text = {
        "hidden_size": t_width,
        "intermediate_size": 4 * t_width,
        "num_hidden_layers": t_layers,
        "num_attention_heads": t_heads,
    }
    if family == "clip":
        tokenizer = _clip_tokenizer()
        text |= {"vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
        model = _scale_weights(CLIPModel(config), initializer_factor)
        crop = {"height": image_size, "width": image_size}
        image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
        return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "siglip":
        tokenizer = _word_tokenizer(64)
        # SigLIP has no image projection: the text head maps onto the vision width
        text |= {"vocab_size": len(tokenizer), "max_position_embeddings": 64, "projection_size": v_width}
        text |= {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1}
        config = SiglipConfig(text_config=text, vision_config=vision)
        model = _scale_weights(SiglipModel(config), initializer_factor)
        with torch.no_grad():  # SigLIP's published initial temperature and bias
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
        return model.eval(), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    msg = f"unknown family {family!r}; choose clip or siglip"
    raise ValueError(msg)


def save_random_model(directory: str | Path, family: str, architecture: str = "tiny", **options: Any) -> Path:
    """Build a random model (options as :func:`build_random_model`) and ``save_pretrained`` it with its
    processor into ``directory``."""
    from xclip.models.loading import quiet_transformers

    with quiet_transformers():
        model, processor = build_random_model(family, architecture, **options)
        directory = Path(directory)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return directory
