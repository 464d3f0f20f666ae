"""What every model family provides to the engine: tokens with their spans, images with their geometry,
references and the split at a layer.

A family adapter turns captions and images into hidden states at a layer (the part of the encoder below the
cut) and describes the part above it as an :class:`~xclip.core.transformer.UpperEncoder`. It knows nothing
about quadrature or interactions.
"""

from __future__ import annotations

import errno
import io
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from xclip.core.transformer import Block, Positions, UpperEncoder, block_forward, embed_from_hidden
from xclip.core.rules import DEFAULT_SETTINGS, IMAGE_REFERENCES, ImageReference
from xclip.errors import ConfigError, InputError
from xclip.core.geometry import ImageResize, Preprocessing, square_image
from xclip.core.tokens import CaptionTokens
from xclip.disk.archives import ArchiveMembers, MemberBytes, split_member_path

# a member path (an image inside a tar or parquet file, see xclip.disk.archives) is read from its archive; bytes
# already read from one come as MemberBytes
ImageLike = Image.Image | str | Path | MemberBytes


@dataclass(frozen=True)
class TextBatch:
    """Tokenised captions, padded to a common length S.

    Attributes:
        input_ids: ``(B, S)`` token ids.
        positions: attention mask and pooled position of each caption.
        eos_index: ``(B,)`` position of each caption's EOS token.
        n_positions: positions per caption that carry contributions (BOS..EOS for causal towers, all S for
            bidirectional ones, whose padding tokens take part in attention).
        tokens: per caption its ``n_positions[b]`` positions: token strings, character spans in the caption,
            special and unknown flags.
        is_truncated: whether a caption was cut to the model's context length.
    """

    input_ids: Tensor
    positions: Positions
    eos_index: Tensor
    n_positions: list[int]
    tokens: list[CaptionTokens]
    is_truncated: list[bool]


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images: ``pixel_values`` ``(B, 3, H, W)`` in normalised pixel space, where each image's
    patches lie in it (``geometry``), and the images as read (a blurred reference is made from them)."""

    pixel_values: Tensor
    geometry: list[Preprocessing]
    images: list[Image.Image]


@dataclass(frozen=True)
class PreprocessedImage:
    """One image as read and preprocessed: ``(3, H, W)`` pixels on the CPU, where its patches lie, the image
    itself (a blurred reference is made from it) and notes on how it was read."""

    pixels: Tensor
    geometry: Preprocessing
    image: Image.Image
    notes: list[str]


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
    """An upright RGB image and notes on what was done to get it, from a PIL image or a path (a member path of a
    tar or parquet file too, or a member's bytes: see :mod:`xclip.disk.archives`).

    Handled on purpose: EXIF orientation is applied (users expect the image upright, and boxes are drawn on
    it); transparency is composited over white, as transformers' processors do; 16-bit greyscale is scaled to
    8 bits, not clipped; of an animated image the first frame is used. Refused with :class:`InputError`
    naming the problem: missing, empty, truncated or unrecognised files, decompression bombs (more pixels than
    Pillow's ``Image.MAX_IMAGE_PIXELS``, about 89 million),
    an aspect ratio beyond ``MAX_ASPECT_RATIO``, floating-point images, symlink loops, and paths that are not
    regular files (a FIFO is never opened: reading it would block the run).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image, image, [])
    if not isinstance(image, (str, Path, MemberBytes)):
        msg = f"images must be PIL images or paths, got {type(image).__name__}"
        raise InputError(msg)
    if not isinstance(image, MemberBytes) and split_member_path(Path(image)) is not None:
        try:
            with ArchiveMembers(max_open=1) as archives:  # one image: callers reading many keep their own reader
                image = archives.read(Path(image))
        except OSError as e:
            msg = f"cannot read image {image}: {e.strerror or e}"
            raise InputError(msg) from e
    if isinstance(image, MemberBytes):
        if not image.data:
            msg = f"image {image.path} is empty (0 bytes)"
            raise InputError(msg)
        return _decode(io.BytesIO(image.data), image.path)
    path = Path(image)
    try:
        status = path.stat()
    except (FileNotFoundError, NotADirectoryError) as e:
        msg = f"image file not found: {image}"
        raise InputError(msg) from e
    except OSError as e:
        raise InputError(_unreadable(image, e)) from e
    if not stat.S_ISREG(status.st_mode):
        kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
                 stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
        kind = next((name for is_kind, name in kinds.items() if is_kind(status.st_mode)), "of an unknown kind")
        msg = f"image file {path} is not a regular file ({kind})"
        raise InputError(msg)
    if status.st_size == 0:
        msg = f"image file {path} is empty (0 bytes)"
        raise InputError(msg)
    return _decode(path, image)


def _decode(source: Path | io.BytesIO, name: object) -> tuple[Image.Image, list[str]]:
    """:func:`read_image`'s decoding of a file or a member's bytes, ``name`` naming it in the messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:  # Pillow refuses images of over Image.MAX_IMAGE_PIXELS
                return _to_rgb(opened, name, [])
    except (FileNotFoundError, NotADirectoryError) as e:  # removed between the stat and the open
        msg = f"image file not found: {name}"
        raise InputError(msg) from e
    except UnidentifiedImageError as e:
        msg = f"cannot read image {name}: not an image format Pillow recognises, or the file is damaged"
        raise InputError(msg) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        msg = f"image {name} is refused as a decompression bomb: {e}"
        raise InputError(msg) from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's decoders report damaged data with these
        raise InputError(_unreadable(name, e)) from e


def _unreadable(name: object, e: Exception) -> str:
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return f"image file {name} is a symlink loop (or its path runs through one)"
    return f"cannot read image {name}: {e}"


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
    if orientation in range(2, 9):  # 1 is upright; 2-8 are the flips and rotations
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    elif orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation} ignored (not 1-8)")
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


@dataclass(frozen=True)
class EncodedCaptions:
    """A family's tokenisation of captions, before the shared bookkeeping of :class:`TextBatch`.

    Attributes:
        input_ids: ``(B, S)`` token ids, padded as the family pads.
        attention_mask: ``(B, S)`` 1 where a token may be attended to.
        offsets: per caption, the ``(start, end)`` character span of each of its ``S`` positions; ``(0, 0)``
            where a token has none.
        special: ``(B, S)`` special tokens (BOS, EOS, padding).
        unknown: ``(B, S)`` the tokenizer's unknown token.
        is_truncated: whether each caption was cut to the context length.
    """

    input_ids: Tensor
    attention_mask: Tensor
    offsets: list[list[tuple[int, int]]]
    special: Tensor
    unknown: Tensor
    is_truncated: list[bool]


class DualEncoderAdapter:
    """What the engine needs of a dual encoder, family-neutral; a family subclass fills in tokenisation,
    image preprocessing, embeddings, readouts and the pooling rules.

    The family contract: :meth:`_encode_captions` gives token ids with each token's character span and
    special/unknown flags; :meth:`_preprocess_image` gives an image's pixel tensor with its typed
    :class:`~xclip.core.geometry.Preprocessing`. Nothing outside ``xclip.models.families`` touches a tokenizer or an
    image processor. Subclasses set ``family`` and implement the methods that raise ``NotImplementedError``.
    """

    family: str = ""
    n_image_prefix: int = 0  # positions before the patches (CLS)
    bos_token_id: int | None = None  # set by the family
    eos_token_id: int = 0
    pad_token_id: int | None = None  # the default filler of reference captions
    vocabulary_size: int = 0
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the pixel normalisation of the image tower
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    image_resize: ImageResize = "native"  # how a non-square image is made square (see xclip.core.geometry.square_image)

    def __init__(self, model: nn.Module, *, name: str = "", revision: str | None = None) -> None:
        self.model = model.eval()
        self.name = name
        self.revision = revision
        self.text_blocks = tuple(self._block(layer) for layer in self._text_layers())
        self.image_blocks = tuple(self._block(layer) for layer in self._image_layers())

    def library_versions(self) -> dict[str, str]:
        """Run-file attributes with the versions of the libraries beyond torch and transformers whose code reads
        this family's inputs (a tokenizer, image transforms): none for the transformers families."""
        return {}

    # --- family-specific pieces ----------------------------------------------------------------------
    def _block(self, layer: nn.Module) -> Block:
        """The shared :class:`Block` view of one of the family's layers."""
        raise NotImplementedError

    def _text_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _image_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _encode_captions(self, captions: list[str]) -> EncodedCaptions:
        raise NotImplementedError

    def _token_strings(self, ids: list[int]) -> list[str]:
        """The tokenizer's string of each id (how special tokens are shown)."""
        raise NotImplementedError

    def _preprocess_image(self, image: Image.Image) -> tuple[Tensor, Preprocessing]:
        """``(3, H, W)`` normalised pixels of an RGB image and where its patches lie in it."""
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
        raise NotImplementedError

    @property
    def patch_grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    # --- shared ---------------------------------------------------------------------------------------
    def vocabulary(self) -> list[str]:
        """Every token id's string, as captions' tokens are labelled (a summary run stores them once)."""
        return self._token_strings(list(range(self.vocabulary_size)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
        encoded = self._encode_captions(captions)
        input_ids = encoded.input_ids.to(self.device)
        attention_mask = encoded.attention_mask.to(self.device)
        positions, eos_index, n_positions = self._text_positions(input_ids, attention_mask)
        special, unknown = encoded.special.tolist(), encoded.unknown.tolist()
        return TextBatch(
            input_ids=input_ids,
            positions=positions,
            eos_index=eos_index,
            n_positions=n_positions,
            tokens=[
                CaptionTokens(caption, self._token_strings(ids[:n]), [tuple(o) for o in offsets[:n]], flags[:n], unknowns[:n])
                for caption, ids, n, offsets, flags, unknowns in zip(
                    captions, input_ids.tolist(), n_positions, encoded.offsets, special, unknown
                )
            ],
            is_truncated=encoded.is_truncated,
        )

    def preprocess_image(self, image: ImageLike) -> PreprocessedImage:
        """One image read (see :func:`read_image`), made square as ``image_resize`` says and preprocessed as
        the family was trained. Raises :class:`InputError`."""
        loaded, notes = read_image(image)
        mean_colour = tuple(round(255 * channel) for channel in self.image_mean)
        square, scale, offset = square_image(loaded, self.image_resize, mean_colour)  # type: ignore[arg-type]
        try:
            pixels, geometry = self._preprocess_image(square)
        except ValueError as e:  # how image processors refuse an image they cannot handle
            msg = f"the image processor refused image {image if isinstance(image, (str, Path)) else ''}: {e}"
            raise InputError(msg) from e
        return PreprocessedImage(pixels, geometry.placed(loaded.size, scale, offset), loaded, notes)

    def preprocess(self, images: Sequence[ImageLike]) -> ImageBatch:
        """Load and preprocess images as the family was trained (see :meth:`preprocess_image`)."""
        if not images:
            msg = "no images given"
            raise InputError(msg)
        processed = [self.preprocess_image(image) for image in images]
        return ImageBatch(
            pixel_values=torch.stack([item.pixels for item in processed]).to(self.device, self.dtype),
            geometry=[item.geometry for item in processed],
            images=[item.image for item in processed],
        )

    def text_reference_ids(self, batch: TextBatch, filler_id: int | None = None) -> Tensor:
        """Reference captions: every content token replaced by ``filler_id`` (default: the pad token).

        Special tokens (BOS, EOS) and everything from EOS on stay, so the reference has the caption's length
        and EOS position.
        """
        filler = self.pad_token_id if filler_id is None else filler_id
        if filler is None:
            msg = "the tokenizer has no pad token; set a text reference filler token"
            raise ConfigError(msg)
        ids = batch.input_ids
        index = torch.arange(ids.shape[1], device=ids.device)
        special = torch.ones_like(ids, dtype=torch.bool)  # positions past a caption's own are no content
        for b, tokens in enumerate(batch.tokens):
            special[b, : len(tokens)] = torch.tensor(tokens.special, dtype=torch.bool)
        content = (index[None, :] < batch.eos_index[:, None]) & ~special
        return torch.where(content, torch.full_like(ids, filler), ids)

    def paper_code_text_ids(self, batch: TextBatch) -> Tensor:
        """The paper's public code's text reference: [BOS,] id 0, EOS, then id 0 up to the caption's length."""
        ids = torch.zeros_like(batch.input_ids)
        bos = self.bos_token_id
        first = 0
        if bos is not None and bool((batch.input_ids[:, 0] == bos).all()):
            ids[:, 0] = bos
            first = 1
        ids[:, first + 1] = self.eos_token_id
        return ids

    def image_reference_pixels(
        self,
        batch: ImageBatch,
        reference: ImageReference = DEFAULT_SETTINGS.image_reference,
        *,
        seed: int = DEFAULT_SETTINGS.reference_seed,
        blur_radius: float = DEFAULT_SETTINGS.blur_radius,
    ) -> Tensor:
        """Reference pixel values ``(1 or B, 3, H, W)``: zeros = the normalised mean colour; black; a blurred
        copy of each image; or Gaussian noise from a fixed seed."""
        shape = (1, *batch.pixel_values.shape[1:])
        if reference == "zeros":
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        if reference == "black":
            mean = torch.tensor(self.image_mean, device=self.device, dtype=self.dtype)
            std = torch.tensor(self.image_std, device=self.device, dtype=self.dtype)
            return (-mean / std)[None, :, None, None].expand(shape).clone()
        if reference == "blur":
            blurred = [self._preprocess_image(image.filter(ImageFilter.GaussianBlur(blur_radius)))[0] for image in batch.images]
            return torch.stack(blurred).to(self.device, self.dtype)
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
