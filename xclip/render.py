"""Heatmap PNGs from a run file: a caption span's map over the image, a box's scores over the caption tokens.

Signed values use a diverging colour map centred at zero (red: the pair raises the score, blue: it lowers it);
the patch grid is upsampled as a float map before colouring, so no hue outside the colour map appears. Each
PNG records the colour scale it used in a text chunk (``xclip:halfrange``).
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from xclip.adapters.base import read_image
from xclip.errors import ConfigError
from xclip.store import DONE, RunReader

COLORMAP = "RdBu_r"
DISPLAY_SIDE = 256  # views smaller than this are enlarged for drawing
ALPHA = 0.55
SPECIAL = {"<|startoftext|>", "<|endoftext|>", "</s>", "<s>", "<pad>", "[CLS]", "[SEP]", "[PAD]"}


@dataclass(frozen=True)
class PairView:
    """What the figures of one pair need, read from the run file."""

    index: int
    caption: str
    tokens: list[str]
    interactions: np.ndarray  # (n_tokens, n_image_positions)
    grid: tuple[int, int]
    n_prefix: int
    image: Image.Image  # the model's view: the original resized and cropped as the processor did
    to_view: Any  # maps original (x, y) to view pixels
    score: float

    def patch_map(self, token_rows: list[int]) -> np.ndarray:
        """``(H, W)``: the summed interactions of the given caption positions with every patch."""
        summed = self.interactions[token_rows].sum(0)[self.n_prefix :]
        return summed.reshape(self.grid)


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        msg = f"--box must be x0,y0,x1,y1 in pixels, got {text!r}"
        raise ConfigError(msg) from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        msg = f"--box {text!r}: coordinates must be finite numbers of pixels"
        raise ConfigError(msg)
    if x1 <= x0 or y1 <= y0:
        msg = f"--box {text!r}: need x0 < x1 and y0 < y1"
        raise ConfigError(msg)
    return x0, y0, x1, y1


def model_view(image: Image.Image, geometry: dict[str, Any]) -> tuple[Image.Image, Any]:
    """Apply the processor's resize and centre crop; returns the view and a map of original (x, y) onto it."""
    width, height = image.size
    resize, crop = geometry.get("resize"), geometry.get("center_crop")
    sx = sy = 1.0
    if resize and "shortest_edge" in resize:
        sx = sy = resize["shortest_edge"] / min(width, height)
    elif resize and "height" in resize:
        sx, sy = resize["width"] / width, resize["height"] / height
    new_w, new_h = max(1, round(width * sx)), max(1, round(height * sy))
    view = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = top = 0
    if crop:
        left, top = (new_w - crop["width"]) // 2, (new_h - crop["height"]) // 2
        view = view.crop((left, top, left + crop["width"], top + crop["height"]))

    def to_view(x: float, y: float) -> tuple[float, float]:
        return x * sx - left, y * sy - top

    return view, to_view


def box_patches(box: tuple[float, float, float, float], view: PairView) -> list[int]:
    """Patch indices (row-major, without prefix) whose centres fall in an original-pixel box; at least one."""
    (x0, y0), (x1, y1) = view.to_view(box[0], box[1]), view.to_view(box[2], box[3])
    rows, cols = view.grid
    cell_w, cell_h = view.image.size[0] / cols, view.image.size[1] / rows
    inside = [
        r * cols + c
        for r in range(rows)
        for c in range(cols)
        if x0 <= (c + 0.5) * cell_w <= x1 and y0 <= (r + 0.5) * cell_h <= y1
    ]
    if inside:
        return inside
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = min(rows - 1, max(0, int(cy / cell_h)))
    c = min(cols - 1, max(0, int(cx / cell_w)))
    return [r * cols + c]


def heatmap_overlay(image: Image.Image, patch_map: np.ndarray, halfrange: float, upsample: str = "bilinear") -> Image.Image:
    """The image with a signed patch map upsampled onto it and blended in ``RdBu_r`` (zero = white)."""
    from matplotlib import colormaps
    from matplotlib.colors import CenteredNorm

    resample = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}.get(upsample)
    if resample is None:
        msg = f"upsample must be bilinear or nearest, got {upsample!r}"
        raise ConfigError(msg)
    field = Image.fromarray(patch_map.astype(np.float32), mode="F").resize(image.size, resample)
    norm = CenteredNorm(vcenter=0.0, halfrange=halfrange or 1.0)
    colours = colormaps[COLORMAP](norm(np.asarray(field)), bytes=True)[..., :3].astype(np.float32)
    blended = (1 - ALPHA) * np.asarray(image.convert("RGB"), dtype=np.float32) + ALPHA * colours
    return Image.fromarray(blended.round().astype(np.uint8))


def _token_text(token: str) -> str:
    """A token as text, without its tokenizer's word marks (see :func:`_word_groups`)."""
    return token.replace("</w>", "").lstrip("▁Ġ").removeprefix("##")


def _word_groups(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Caption words and their token rows, special tokens left out.

    Word boundaries follow the tokenizer's own marks: CLIP's BPE ends a word with ``</w>``, SentencePiece
    starts one with ``▁``, byte-level BPE with ``Ġ``, WordPiece continues one with ``##``; a word-level
    vocabulary has none of these, and then every token is a word.
    """
    content = [t for t in tokens if t not in SPECIAL and t]
    if any(t.endswith("</w>") for t in content):
        def starts_new(token: str, previous: str | None) -> bool:
            return previous is None or previous.endswith("</w>")
    elif any(t.startswith(("▁", "Ġ")) for t in content):
        def starts_new(token: str, previous: str | None) -> bool:
            return previous is None or token.startswith(("▁", "Ġ"))
    else:
        def starts_new(token: str, previous: str | None) -> bool:
            return previous is None or not token.startswith("##")

    groups: list[tuple[str, list[int]]] = []
    previous: str | None = None
    for row, token in enumerate(tokens):
        if token in SPECIAL or not token:
            previous = None
            continue
        clean = _token_text(token)
        if starts_new(token, previous) or not groups:
            groups.append((clean, [row]))
        else:
            word, rows = groups[-1]
            groups[-1] = (word + clean, [*rows, row])
        previous = token
    return groups


def span_rows(span: str, tokens: list[str]) -> list[int]:
    """Token rows of a span: ``"2:4"`` / ``"3"`` (indices) or a substring of the caption's words."""
    if not span.strip():
        msg = "--span is empty: give words of the caption (such as 'red dog') or token indices (such as 2:4)"
        raise ConfigError(msg)
    if re.fullmatch(r"\d+(:\d+)?", span):
        first, _, last = span.partition(":")
        rows = list(range(int(first), int(last) if last else int(first) + 1))
        if not rows or rows[-1] >= len(tokens):
            msg = f"span {span!r} is outside the caption's {len(tokens)} tokens"
            raise ConfigError(msg)
        return rows
    words = _word_groups(tokens)
    text, starts = "", []
    for word, _ in words:
        starts.append(len(text))
        text += word + " "
    begin = text.lower().find(span.lower())
    if begin < 0:
        msg = f"span {span!r} does not occur in the caption {text.strip()!r}"
        raise ConfigError(msg)
    end = begin + len(span)
    return [row for (word, rows), s in zip(words, starts) if s < end and s + len(word) > begin for row in rows]


def _figure(view: PairView, panels: list[tuple[str, np.ndarray]], token_scores: np.ndarray | None,
            highlight_rows: list[int], box: tuple[float, float, float, float] | None, upsample: str, path: Path,
            context: tuple[str, np.ndarray] | None = None) -> Path:
    """Panels and token strip on one symmetric colour scale (the colour bar's); ``context``, a map whose
    magnitude would drown the others (the whole caption, which includes BOS and EOS), gets its own scale."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import CenteredNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = [m for _, m in panels] + ([token_scores] if token_scores is not None else [])
    halfrange = float(max(np.abs(v).max() for v in values)) or 1.0
    norm, cmap = CenteredNorm(vcenter=0.0, halfrange=halfrange), colormaps[COLORMAP]
    scales = [halfrange] * len(panels)
    if context is not None:
        context_range = float(np.abs(context[1]).max()) or 1.0
        panels = [*panels, (f"{context[0]} (own scale ±{context_range:.2g})", context[1])]
        scales.append(context_range)
    n = len(panels)
    columns = min(n, 4)
    rows = -(-n // columns)
    fig = Figure(figsize=(max(3.2 * columns + 1.4, 6.0), 3.2 * rows + 1.4), dpi=100, layout="constrained")
    grid = fig.add_gridspec(rows + 1, columns + 1, height_ratios=[*[1.0] * rows, 0.28], width_ratios=[*[1.0] * columns, 0.06])
    # small model inputs (a 64-pixel view) are enlarged before the map is laid on, so the smooth upsampling
    # happens at display resolution rather than in matplotlib's blur
    zoom = max(1, -(-DISPLAY_SIDE // max(view.image.size)))
    display = view.image.resize((view.image.size[0] * zoom, view.image.size[1] * zoom), Image.Resampling.BICUBIC)
    for k, ((title, patch_map), scale) in enumerate(zip(panels, scales)):
        ax = fig.add_subplot(grid[k // columns, k % columns])
        ax.imshow(heatmap_overlay(display, patch_map, scale, upsample))
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        if box is not None:
            (x0, y0), (x1, y1) = view.to_view(box[0], box[1]), view.to_view(box[2], box[3])
            ax.add_patch(Rectangle((x0 * zoom, y0 * zoom), (x1 - x0) * zoom, (y1 - y0) * zoom, fill=False,
                                   edgecolor="black", linewidth=2))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_subplot(grid[:rows, columns]), label="interaction")
    _token_strip(fig, fig.add_subplot(grid[rows, :]), view.tokens, token_scores, highlight_rows, norm, cmap)
    title = f"pair {view.index}: {view.caption!r}  (score {view.score:.4f})"
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=11)  # ~11 characters an inch
    metadata = PngInfo()
    metadata.add_text("xclip:halfrange", f"{halfrange:.6g}")
    metadata.add_text("xclip:colormap", COLORMAP)
    metadata.add_text("xclip:upsample", upsample)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, pil_kwargs={"pnginfo": metadata})
    return path


def _token_strip(fig: Any, strip: Any, tokens: list[str], token_scores: np.ndarray | None,
                 highlight_rows: list[int], norm: Any, cmap: Any) -> None:
    """The caption's words left to right, wrapped, each on its summed score's colour; the span outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    strip.set_axis_off()
    width = strip.get_window_extent(renderer).width
    x, y = 0.01, 0.75
    for word, rows in _word_groups(tokens):
        score = float(token_scores[rows].sum()) if token_scores is not None else None
        face = cmap(norm(score)) if score is not None else "white"
        is_highlighted = any(r in highlight_rows for r in rows)
        text = strip.text(x, y, word, fontsize=11, va="center", transform=strip.transAxes,
                          fontweight="bold" if is_highlighted else "normal",
                          bbox={"facecolor": face, "edgecolor": "black" if is_highlighted else "0.8",
                                "boxstyle": "round,pad=0.3"})
        x += text.get_window_extent(renderer).width / width + 0.03
        if x > 0.92:
            x, y = 0.01, y - 0.45


def load_pair_view(run: RunReader, index: int, data_root: Path) -> PairView:
    c, i = int(run.column("pairs", "caption_index")[index]), int(run.column("pairs", "image_index")[index])
    image_path = data_root / run.image_paths()[i]
    if not image_path.is_file():
        msg = f"image {image_path} of pair {index} is not there: was the data moved? pass --data-root with its new folder"
        raise ConfigError(msg)
    view, to_view = model_view(read_image(image_path)[0], run.geometry)
    return PairView(
        index=index,
        caption=run.captions()[c],
        tokens=run.tokens(c),
        interactions=run.interactions(index),
        grid=run.grid,
        n_prefix=run.n_prefix,
        image=view,
        to_view=to_view,
        score=float(run.value("pairs", "score", index)),
    )


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-") or "tokens"


def render_pair(view: PairView, out: Path, *, span: str | None = None,
                box: tuple[float, float, float, float] | None = None, upsample: str = "bilinear") -> Path:
    """One PNG: the span's map (``span``), the box's token scores (``box``), or per-word panels (neither)."""
    if span is not None:
        rows = span_rows(span, view.tokens)
        label = " ".join(_token_text(view.tokens[r]) for r in rows)
        return _figure(view, [(f"span: {label}", view.patch_map(rows))], None, rows, box, upsample,
                       out / f"pair{view.index:06d}_span-{_slug(label)}.png")  # one file per span
    if box is not None:
        patches = [view.n_prefix + p for p in box_patches(box, view)]
        token_scores = view.interactions[:, patches].sum(1)
        whole = ("whole caption", view.patch_map(list(range(len(view.tokens)))))
        return _figure(view, [], token_scores, [], box, upsample, out / f"pair{view.index:06d}_box-{_slug(' '.join(f'{v:g}' for v in box))}.png", whole)
    panels = [(word, view.patch_map(rows)) for word, rows in _word_groups(view.tokens)]
    whole = ("whole caption", view.patch_map(list(range(len(view.tokens)))))
    return _figure(view, panels, None, [], None, upsample, out / f"pair{view.index:06d}.png", whole)


def render_run(run_dir: str | Path, *, pairs: list[int] | None = None, span: str | None = None,
               box: tuple[float, float, float, float] | None = None, out: Path | None = None,
               upsample: str = "bilinear", limit: int = 100, data_root: Path | None = None) -> list[Path]:
    """Render finished pairs of a run (also while it is still running); returns the PNG paths.

    ``data_root`` replaces the run's ``data.root`` when the images have moved since the run."""
    if limit < 1:
        msg = f"--limit must be at least 1, got {limit}"
        raise ConfigError(msg)
    if upsample not in ("bilinear", "nearest"):
        msg = f"--upsample must be bilinear or nearest, got {upsample!r}"
        raise ConfigError(msg)
    with RunReader(run_dir) as run:
        out = out or run.path.parent / "heatmaps"
        status = run.status("pairs")
        if pairs:
            for index in pairs:
                if not 0 <= index < len(status) or status[index] != DONE:
                    msg = f"pair {index} is not a finished pair of {run.path} (it has {len(status)} pairs)"
                    raise ConfigError(msg)
            selected = pairs
        else:
            selected = [int(i) for i in np.flatnonzero(status == DONE)[:limit]]
        if box is not None:
            sizes, image_index = run.column("images", "original_size"), run.column("pairs", "image_index")
            for index in selected:
                width, height = (int(v) for v in sizes[int(image_index[index])])
                if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
                    msg = f"--box {','.join(f'{v:g}' for v in box)} is not inside the image of pair {index} ({width} x {height} pixels)"
                    raise ConfigError(msg)
        root = run.data_root(data_root)
        return [render_pair(load_pair_view(run, index, root), out, span=span, box=box, upsample=upsample)
                for index in selected]
