"""Where each patch of the model's input lies in the original image, and which patches a box covers.

An adapter describes its preprocessing of one image as a :class:`Preprocessing`: the rectangle of the original
image that the model's input shows (``crop_box``, in original pixels; the whole image for a squash resize, the
centred part for resize-then-crop) and the patch grid laid over it. Every reader (render, evaluate, the viewer,
an :class:`~xclip.InteractionMap`) answers "which patches does this box cover" through :meth:`box_coverage`,
so that they agree to the bit.

How a box counts: each patch counts with the share of its area that the box covers, a weight in (0, 1]. A
10 x 10 px box inside one 32 x 32 px patch covers that patch with weight 0.098, not 0 (it lies between
centres) and not 1 (it is not the whole patch). Render and the viewer sum a box's interactions with these
weights; the grounding metrics weigh patches by them. A box wholly outside the crop covers nothing the model
saw and is refused; a box partly outside counts for its part inside, and :meth:`crop_share` says how much.
Pure numpy and Pillow: no model, no tokenizer, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from xclip.errors import ConfigError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels, x0 < x1, y0 < y1
# How a non-square image reaches a square model input: ``native`` is the checkpoint's own processor (CLIP and
# open_clip: resize the short side, then crop the centre; SigLIP: squash); the others make the image square first.
ImageResize = Literal["native", "crop", "pad", "squash"]
IMAGE_RESIZES: tuple[str, ...] = get_args(ImageResize)
# a squashed image's side: larger than any supported model input, so the processor's own resize sets the pixels
_SQUASH_SIDE = 1024


@dataclass(frozen=True)
class Preprocessing:
    """How one image became the model's input.

    Attributes:
        original_size: ``(width, height)`` of the image as read (upright, before any resize).
        crop_box: ``(x0, y0, x1, y1)``: the rectangle of the original image, in its pixels, that the model's
            input shows; it is resized onto ``input_size``.
        input_size: ``(width, height)`` of the model's input in pixels.
        grid: ``(rows, columns)`` of patches over the input.
    """

    original_size: tuple[int, int]
    crop_box: Box
    input_size: tuple[int, int]
    grid: tuple[int, int]

    @classmethod
    def resize_then_crop(
        cls, original_size: tuple[int, int], resized_size: tuple[int, int], crop_origin: tuple[int, int],
        input_size: tuple[int, int], grid: tuple[int, int],
    ) -> Preprocessing:
        """A resize to ``resized_size`` followed by a crop of ``input_size`` at ``crop_origin`` (``left, top``
        in resized pixels); a squash resize is the crop at (0, 0) of a resize to ``input_size``."""
        (width, height), (resized_w, resized_h) = original_size, resized_size
        scale_x, scale_y = resized_w / width, resized_h / height
        left, top = crop_origin
        box = (left / scale_x, top / scale_y, (left + input_size[0]) / scale_x, (top + input_size[1]) / scale_y)
        return cls(tuple(original_size), box, tuple(input_size), tuple(grid))  # type: ignore[arg-type]

    def placed(self, original_size: tuple[int, int], scale: tuple[float, float], offset: tuple[float, float]) -> Preprocessing:
        """This preprocessing of an image made from ``original_size`` pixels (padded, cropped or squashed before
        the family's own preprocessing), in that original's pixels: a point ``(x, y)`` of the made image is
        ``(x * scale[0] + offset[0], y * scale[1] + offset[1])`` of the original."""
        x0, y0, x1, y1 = self.crop_box
        (sx, sy), (ox, oy) = scale, offset
        box = (x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy)
        return Preprocessing(tuple(original_size), box, self.input_size, self.grid)  # type: ignore[arg-type]

    @property
    def seen_share(self) -> float:
        """The share of the original image's area that the model's input shows (1.0 unless a crop cut some)."""
        return float(seen_shares(self.to_row()[None])[0])

    def padding_mask(self, size: tuple[int, int], *, margin: int) -> np.ndarray:
        """``(height, width)`` bool for a view of the model's input drawn at ``size`` pixels: True where it shows
        padding (``image.resize: pad``) or lies within ``margin`` view pixels of it (the outline detector's reach:
        its blur radius and gradient step, and one), where it would find the edge of the padding rather than of
        an object."""
        width, height = size
        x0, y0, x1, y1 = self.crop_box
        columns = x0 + (np.arange(width) + 0.5) * (x1 - x0) / width  # each pixel's centre in original pixels
        rows = y0 + (np.arange(height) + 0.5) * (y1 - y0) / height
        near_x, near_y = margin * (x1 - x0) / width, margin * (y1 - y0) / height
        outside_x = (columns < near_x) | (columns > self.original_size[0] - near_x)
        outside_y = (rows < near_y) | (rows > self.original_size[1] - near_y)
        pads_x = x0 < 0 or x1 > self.original_size[0]
        pads_y = y0 < 0 or y1 > self.original_size[1]
        return (outside_x[None, :] & pads_x) | (outside_y[:, None] & pads_y)

    # --- stored as one row of numbers (the run file's images/preprocessing) ----------------------------------
    def to_row(self) -> np.ndarray:
        """``(10,)`` float64: original width, height; crop box; input width, height; grid rows, columns."""
        return np.array([*self.original_size, *self.crop_box, *self.input_size, *self.grid], dtype=np.float64)

    @classmethod
    def from_row(cls, row: np.ndarray) -> Preprocessing:
        values = [float(v) for v in row]
        return cls(
            (int(values[0]), int(values[1])), tuple(values[2:6]),  # type: ignore[arg-type]
            (int(values[6]), int(values[7])), (int(values[8]), int(values[9])),
        )

    # --- patches --------------------------------------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patch_rects(self) -> np.ndarray:
        """``(rows * columns, 4)``: each patch's rectangle ``x0, y0, x1, y1`` in original pixels, row-major."""
        rows, cols = self.grid
        x0, y0, x1, y1 = self.crop_box
        xs, ys = np.linspace(x0, x1, cols + 1), np.linspace(y0, y1, rows + 1)
        left, top = np.meshgrid(xs[:-1], ys[:-1])
        right, bottom = np.meshgrid(xs[1:], ys[1:])
        return np.stack([left, top, right, bottom], axis=-1).reshape(-1, 4)

    def box_coverage(self, box: Box) -> np.ndarray:
        """``(rows * columns,)``: the share of each patch's area inside ``box`` (original pixels).

        Raises:
            ConfigError: the box lies wholly outside the crop, so the model saw none of it.
        """
        box = check_box(box)
        if self.crop_share(box) == 0.0:
            x0, y0, x1, y1 = self.crop_box
            msg = (
                f"box {_format_box(box)} lies wholly outside the part of the image the model sees "
                f"(x {x0:.4g}..{x1:.4g}, y {y0:.4g}..{y1:.4g} of the {self.original_size[0]} x {self.original_size[1]} "
                "image; the preprocessing cropped the rest)"
            )
            raise ConfigError(msg, setting="box")
        rects = self.patch_rects()
        return _overlap(rects, box) / ((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1]))

    def crop_share(self, box: Box) -> float:
        """The share of the box's area that lies inside the crop (what the model saw of it)."""
        area = (box[2] - box[0]) * (box[3] - box[1])
        return float(_overlap(np.asarray([self.crop_box]), box)[0] / area) if area > 0 else 0.0

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original-image coordinates in input pixels."""
        x0, y0, x1, y1 = self.crop_box
        return (x - x0) * self.input_size[0] / (x1 - x0), (y - y0) * self.input_size[1] / (y1 - y0)

    def model_view(self, image: object, fill: tuple[int, int, int] = (128, 128, 128)) -> object:
        """The original ``image`` (PIL) as the model saw it: the crop box resized to the input size, bicubic;
        where the box reaches beyond the image (``image.resize: pad``), ``fill`` shows the padding."""
        from PIL import Image

        width, height = self.original_size
        x0, y0, x1, y1 = self.crop_box
        inside = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))  # Pillow takes no box beyond the image
        if inside == (x0, y0, x1, y1):
            return image.resize(self.input_size, Image.Resampling.BICUBIC, box=inside)  # type: ignore[attr-defined]
        scale_x, scale_y = self.input_size[0] / (x1 - x0), self.input_size[1] / (y1 - y0)
        left, top = round((inside[0] - x0) * scale_x), round((inside[1] - y0) * scale_y)
        size = (max(1, round((inside[2] - x0) * scale_x) - left), max(1, round((inside[3] - y0) * scale_y) - top))
        view = Image.new("RGB", self.input_size, fill)
        view.paste(image.resize(size, Image.Resampling.BICUBIC, box=inside), (left, top))  # type: ignore[attr-defined]
        return view


def position_labels(n_prefix: int, grid: tuple[int, int]) -> list[str]:
    """An image's position labels: ``cls`` for each prefix position, then ``patch(row,column)`` row by row (the
    engine's results and a run file's readers give the same)."""
    return ["cls"] * n_prefix + [f"patch({r},{c})" for r in range(grid[0]) for c in range(grid[1])]


def seen_shares(rows: np.ndarray) -> np.ndarray:
    """``(N,)``: :attr:`Preprocessing.seen_share` of each of ``N`` stored rows (``(N, 10)``, see
    :meth:`Preprocessing.to_row`) at once: a run's whole ``images/preprocessing`` column in one step."""
    width, height = rows[:, 0], rows[:, 1]
    x0, y0, x1, y1 = (rows[:, k] for k in range(2, 6))
    inside_w = np.clip(np.minimum(x1, width) - np.maximum(x0, 0.0), 0, None)
    inside_h = np.clip(np.minimum(y1, height) - np.maximum(y0, 0.0), 0, None)
    return inside_w * inside_h / (width * height)


def check_image_resize(resize: object) -> None:
    """Refuse a value that is not one of :data:`IMAGE_RESIZES` (:class:`ConfigError` naming ``image_resize``)."""
    if resize not in IMAGE_RESIZES:
        msg = f"image_resize {resize!r} is not one of {', '.join(IMAGE_RESIZES)}"
        raise ConfigError(msg, setting="image_resize")


def _overlap(rects: np.ndarray, box: Box) -> np.ndarray:
    """Area of each rectangle ``(N, 4)`` inside ``box``."""
    width = np.clip(np.minimum(rects[:, 2], box[2]) - np.maximum(rects[:, 0], box[0]), 0, None)
    height = np.clip(np.minimum(rects[:, 3], box[3]) - np.maximum(rects[:, 1], box[1]), 0, None)
    return width * height


def _format_box(box: Box) -> str:
    return ",".join(f"{v:g}" for v in box)


def check_box(box: object, *, name: str = "box", given: object = None) -> Box:
    """``box`` (four numbers, or their texts) as four finite floats with ``x0 < x1`` and ``y0 < y1``;
    :class:`ConfigError` otherwise, calling it ``name`` and quoting ``given`` (default: ``box``)."""
    shown = repr(box if given is None else given)
    try:
        values = tuple(float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4:
        msg = f"{name} must be x0,y0,x1,y1 in pixels, got {shown}"
        raise ConfigError(msg, setting="box")
    if not all(np.isfinite(values)):
        msg = f"{name} {shown}: coordinates must be finite numbers of pixels"
        raise ConfigError(msg, setting="box")
    if values[2] <= values[0] or values[3] <= values[1]:
        msg = f"{name} {shown}: need x0 < x1 and y0 < y1"
        raise ConfigError(msg, setting="box")
    return values  # type: ignore[return-value]


def square_image(image: Any, resize: ImageResize, fill: tuple[int, int, int]) -> tuple[Any, tuple[float, float], tuple[float, float]]:
    """``image`` (PIL) made square as ``resize`` says, before the family's own preprocessing, with the map back
    to its pixels (``scale``, ``offset``: see :meth:`Preprocessing.placed`). ``pad`` centres the image on a
    square of ``fill`` (the model's mean colour, so padding looks like the mean-colour reference); ``crop``
    keeps the centred square; ``squash`` stretches the image onto a square; ``native`` leaves it as it is."""
    from PIL import Image

    width, height = image.size
    if resize == "native" or width == height:
        return image, (1.0, 1.0), (0.0, 0.0)
    if resize == "pad":
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        padded = Image.new("RGB", (side, side), fill)
        padded.paste(image, (left, top))
        return padded, (1.0, 1.0), (-float(left), -float(top))
    if resize == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side)), (1.0, 1.0), (float(left), float(top))
    side = min(max(width, height), _SQUASH_SIDE)
    return image.resize((side, side), Image.Resampling.BICUBIC), (width / side, height / side), (0.0, 0.0)
