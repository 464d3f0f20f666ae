"""What every model family provides to the engine: token geometry, references and the split at a layer.

A family adapter turns captions and images into hidden states at a layer (the part of the encoder below the
cut) and describes the part above it as an :class:`~xclip.core.transformer.UpperEncoder`. It knows nothing
about quadrature or interactions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from xclip.core.transformer import Block, Positions, UpperEncoder, block_forward, embed_from_hidden
from xclip.errors import ConfigError, InputError

ImageReference = Literal["zeros", "black", "blur", "noise"]
IMAGE_REFERENCES: tuple[str, ...] = get_args(ImageReference)
ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class TextBatch:
    """Tokenised captions, padded to a common length S.

    Attributes:
        input_ids: ``(B, S)`` token ids.
        positions: attention mask and pooled position of each caption.
        eos_index: ``(B,)`` position of each caption's EOS token.
        n_positions: positions per caption that carry contributions (BOS..EOS for causal towers, all S for
            bidirectional ones, whose padding tokens take part in attention).
        tokens: token strings per caption, ``n_positions[b]`` of them.
        is_truncated: whether a caption was cut to the model's context length.
    """

    input_ids: Tensor
    positions: Positions
    eos_index: Tensor
    n_positions: list[int]
    tokens: list[list[str]]
    is_truncated: list[bool]


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images: ``pixel_values`` ``(B, 3, H, W)`` in normalised pixel space."""

    pixel_values: Tensor
    original_sizes: list[tuple[int, int]]  # (width, height) before preprocessing
    images: list[Image.Image]


# A caption is read as at most a context of tokens (77 for CLIP); a record far longer than any caption is a
# broken file (a swallowed column, a whole document), and tokenising megabytes of it would cost real time.
MAX_CAPTION_CHARS = 10_000
# Processors resize the short side to the model's input size first, so a 150000 x 1 image would become a
# 224 x 33,600,000 one (gigabytes) before it is cropped. No photograph comes near this ratio.
MAX_ASPECT_RATIO = 50


def text_problem(text: object, what: str = "the caption") -> str | None:
    """Why ``text`` cannot be a caption, or None when it can; ``what`` names it in the message (a field of a
    data file, such as ``'text'``)."""
    if not isinstance(text, str):
        return f"{what} must be a string, got {type(text).__name__}"
    if not text.strip():
        return f"{what} is empty: there is nothing to attribute"
    if len(text) > MAX_CAPTION_CHARS:
        return f"{what} is {len(text)} characters long; at most {MAX_CAPTION_CHARS} are accepted"
    for position, character in enumerate(text):
        code = ord(character)
        if code == 0:
            return f"{what} holds a NUL character at position {position}"
        if 0xD800 <= code <= 0xDFFF:
            return f"{what} holds U+{code:04X} at position {position}, which is not a character (bytes that are not UTF-8, or an unpaired surrogate escape)"
    return None


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (see :func:`read_image`); raises :class:`InputError`."""
    return read_image(image)[0]


def read_image(image: ImageLike) -> tuple[Image.Image, list[str]]:
    """An upright RGB image and notes on what was done to get it, from a PIL image or a path.

    Handled on purpose: EXIF orientation is applied (users expect the image upright, and boxes are drawn on
    it); transparency is composited over white, as transformers' processors do; 16-bit greyscale is scaled to
    8 bits, not clipped; of an animated image the first frame is used. Refused with :class:`InputError`
    naming the problem: missing, empty, truncated or unrecognised files, decompression bombs (more pixels than
    Pillow's ``Image.MAX_IMAGE_PIXELS``, about 89 million),
    an aspect ratio beyond ``MAX_ASPECT_RATIO``, floating-point images.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image, image, [])
    if not isinstance(image, (str, Path)):
        msg = f"images must be PIL images or paths, got {type(image).__name__}"
        raise InputError(msg)
    path = Path(image)
    try:
        if path.stat().st_size == 0:
            msg = f"image file {path} is empty (0 bytes)"
            raise InputError(msg)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:  # Pillow refuses images of over Image.MAX_IMAGE_PIXELS
                return _to_rgb(opened, path, [])
    except (FileNotFoundError, NotADirectoryError) as e:
        msg = f"image file not found: {image}"
        raise InputError(msg) from e
    except UnidentifiedImageError as e:
        msg = f"cannot read image {image}: not an image format Pillow recognises, or the file is damaged"
        raise InputError(msg) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        msg = f"image {image} is refused as a decompression bomb: {e}"
        raise InputError(msg) from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's decoders report damaged data with these
        msg = f"cannot read image {image}: {e}"
        raise InputError(msg) from e


def _to_rgb(image: Image.Image, source: object, notes: list[str]) -> tuple[Image.Image, list[str]]:
    width, height = image.size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        msg = f"image {source} is {width} x {height} pixels: an aspect ratio beyond {MAX_ASPECT_RATIO}:1 is refused (its resize to the model's input would take gigabytes)"
        raise InputError(msg)
    n_frames = getattr(image, "n_frames", 1)
    if n_frames > 1:
        image.seek(0)
        notes.append(f"first of {n_frames} frames")
    image.load()
    orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    if image.mode == "F":
        msg = f"image {source} holds floating-point pixels (mode F); save it as 8- or 16-bit"
        raise InputError(msg)
    if image.mode.startswith("I"):  # 16-bit greyscale (I;16, or I holding 16-bit values): scale, do not clip
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
        notes.append("16-bit greyscale scaled to 8 bits")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        notes.append("transparency composited over white")
    return image.convert("RGB"), notes


def resolve_layer(layer: int, n_layers: int, tower: str) -> int:
    """A block index in ``[0, n_layers)``; negative indices count from the end."""
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        msg = f"{tower} layer {layer} is out of range: the {tower} encoder has {n_layers} blocks, so use 0..{n_layers - 1} or -{n_layers}..-1"
        raise ConfigError(msg)
    return resolved


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


class DualEncoderAdapter:
    """Shared machinery of HF dual encoders; a family subclass fills in embeddings, readouts and tokens.

    Subclasses set ``family`` and implement the methods that raise ``NotImplementedError``.
    """

    family: str = ""
    n_image_prefix: int = 0  # positions before the patches (CLS); dropped from image maps

    def __init__(self, model: nn.Module, processor: Any, *, name: str = "", revision: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.name = name
        self.revision = revision
        self.text_blocks = tuple(self._block(layer) for layer in self._text_layers())
        self.image_blocks = tuple(self._block(layer) for layer in self._image_layers())

    # --- family-specific pieces ----------------------------------------------------------------------
    def _block(self, layer: nn.Module) -> Block:
        """The shared :class:`Block` view of one of the family's layers (HF's layer layout by default)."""
        return hf_block(layer)

    def _text_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _image_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _text_positions(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Positions, Tensor, list[int]]:
        """(positions, eos_index, n_positions) of tokenised captions."""
        raise NotImplementedError

    def pooled_index(self, input_ids: Tensor) -> Tensor:
        """``(B,)`` position the text readout pools, by the family's rule."""
        raise NotImplementedError

    def image_pooled_index(self, n_images: int) -> Tensor | None:
        """``(B,)`` position the image readout pools, or None for a readout over all positions."""
        raise NotImplementedError

    def _text_embeddings(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def _image_embeddings(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def text_upper(self, layer: int) -> UpperEncoder:
        """The text encoder above block ``layer`` (resolved), ending in the unnormalised embedding."""
        raise NotImplementedError

    def image_upper(self, layer: int) -> UpperEncoder:
        """The image encoder above block ``layer`` (resolved), ending in the unnormalised embedding."""
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int:
        raise NotImplementedError

    @property
    def max_text_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def preprocessing_geometry(self) -> dict[str, Any]:
        """How the image processor maps an original image onto the model's input: for boxes and overlays."""
        processor = self.image_processor
        size = dict(processor.size) if getattr(processor, "do_resize", True) else None
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        return {"resize": size, "center_crop": crop}

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    # --- shared ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def patch_grid(self) -> tuple[int, int]:
        config = self.model.config.vision_config
        side = config.image_size // config.patch_size
        return side, side

    def tokenize(self, captions: Sequence[str]) -> TextBatch:
        """Tokenise captions the way the family was trained; raises :class:`InputError` for empty ones."""
        captions = list(captions)
        for i, caption in enumerate(captions):
            problem = text_problem(caption)
            if problem is not None:
                msg = f"caption {i}: {problem}" if len(captions) > 1 else problem
                raise InputError(msg)
        if not captions:
            msg = "no captions given"
            raise InputError(msg)
        encoded = self._tokenize(captions)
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded["attention_mask"].to(self.device)
        positions, eos_index, n_positions = self._text_positions(input_ids, attention_mask)
        max_length = input_ids.shape[1]
        untruncated = self.tokenizer(captions, truncation=False)["input_ids"]
        return TextBatch(
            input_ids=input_ids,
            positions=positions,
            eos_index=eos_index,
            n_positions=n_positions,
            tokens=[self.tokenizer.convert_ids_to_tokens(ids[:n]) for ids, n in zip(input_ids.tolist(), n_positions)],
            is_truncated=[len(ids) > max_length for ids in untruncated],
        )

    def preprocess(self, images: Sequence[ImageLike]) -> ImageBatch:
        """Load and preprocess images with the model's own image processor."""
        loaded = [load_image(image) for image in images]
        if not loaded:
            msg = "no images given"
            raise InputError(msg)
        pixel_values = self.image_processor(images=loaded, return_tensors="pt")["pixel_values"]
        return ImageBatch(
            pixel_values=pixel_values.to(self.device, self.dtype),
            original_sizes=[image.size for image in loaded],
            images=loaded,
        )

    def text_reference_ids(self, batch: TextBatch, filler_id: int | None = None) -> Tensor:
        """Reference captions: every content token replaced by ``filler_id`` (default: the pad token).

        Special tokens (BOS, EOS) and everything from EOS on stay, so the reference has the caption's length
        and EOS position.
        """
        filler = self.tokenizer.pad_token_id if filler_id is None else filler_id
        if filler is None:
            msg = "the tokenizer has no pad token; set a text reference filler token"
            raise ConfigError(msg)
        ids = batch.input_ids
        index = torch.arange(ids.shape[1], device=ids.device)
        special = torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids, device=ids.device))
        content = (index[None, :] < batch.eos_index[:, None]) & ~special
        return torch.where(content, torch.full_like(ids, filler), ids)

    def reference_code_text_ids(self, batch: TextBatch) -> Tensor:
        """The public reference code's text reference: [BOS,] id 0, EOS, then id 0 up to the caption's length."""
        ids = torch.zeros_like(batch.input_ids)
        bos = self.tokenizer.bos_token_id
        first = 0
        if bos is not None and bool((batch.input_ids[:, 0] == bos).all()):
            ids[:, 0] = bos
            first = 1
        ids[:, first + 1] = self.tokenizer.eos_token_id
        return ids

    def image_reference_pixels(
        self, batch: ImageBatch, reference: ImageReference = "zeros", *, seed: int = 0, blur_radius: float = 16.0
    ) -> Tensor:
        """Reference pixel values ``(1 or B, 3, H, W)``: zeros = the normalised mean colour; black; a blurred
        copy of each image; or Gaussian noise from a fixed seed."""
        shape = (1, *batch.pixel_values.shape[1:])
        if reference == "zeros":
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        if reference == "black":
            mean = torch.tensor(self.image_processor.image_mean, device=self.device, dtype=self.dtype)
            std = torch.tensor(self.image_processor.image_std, device=self.device, dtype=self.dtype)
            return (-mean / std)[None, :, None, None].expand(shape).clone()
        if reference == "blur":
            blurred = [image.filter(ImageFilter.GaussianBlur(blur_radius)) for image in batch.images]
            pixel_values = self.image_processor(images=blurred, return_tensors="pt")["pixel_values"]
            return pixel_values.to(self.device, self.dtype)
        if reference == "noise":
            generator = torch.Generator().manual_seed(seed)
            return torch.randn(shape, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
        msg = f"unknown image reference {reference!r}; choose one of {', '.join(IMAGE_REFERENCES)}"
        raise ConfigError(msg)

    @torch.no_grad()
    def text_hidden(self, input_ids: Tensor, positions: Positions, layer: int) -> Tensor:
        """Hidden states ``(B, S, d)`` entering text block ``layer`` (resolved)."""
        hidden = self._text_embeddings(input_ids)
        for block in self.text_blocks[:layer]:
            hidden = block_forward(block, hidden, positions.mask, fused=True)
        return hidden

    @torch.no_grad()
    def image_hidden(self, pixel_values: Tensor, layer: int) -> Tensor:
        """Hidden states ``(B, S, d)`` entering image block ``layer`` (resolved)."""
        hidden = self._image_embeddings(pixel_values)
        for block in self.image_blocks[:layer]:
            hidden = block_forward(block, hidden, None, fused=True)
        return hidden

    @torch.no_grad()
    def embed_text(self, batch: TextBatch) -> Tensor:
        """Normalised caption embeddings ``(B, E)``: the fused layers up to the last block, then that block."""
        layer = len(self.text_blocks) - 1
        hidden = self.text_hidden(batch.input_ids, batch.positions, layer)
        return embed_from_hidden(self.text_upper(layer), hidden, batch.positions, normalize=True)

    @torch.no_grad()
    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """Normalised image embeddings ``(B, E)`` of preprocessed pixels."""
        layer = len(self.image_blocks) - 1
        positions = Positions(pooled_index=self.image_pooled_index(pixel_values.shape[0]))
        return embed_from_hidden(self.image_upper(layer), self.image_hidden(pixel_values, layer), positions, normalize=True)
