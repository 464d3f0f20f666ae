"""A seeded world of coloured shapes with exact boxes and phrase spans: ground truth for grounding.

Scenes hold 1 to 4 objects (a colour from ``COLOURS`` and a shape from ``SHAPES``) on a plain or textured
background; captions name some or all of them in varied templates, and every object phrase ("red circle") comes
with its character span in the caption and its box in the image. ``hard_negative`` swaps colours between
objects (or recolours a lone one), so a model must bind colour to shape to tell the two captions apart;
``replacement_negative`` names one object the scene does not hold, so it must also tell every object apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (130, 40, 170),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PAIR_TEMPLATES = ("{a} and {b}", "{a} next to {b}", "{a} with {b}", "two objects: {a} and {b}", "{a} beside {b}")
SINGLE_TEMPLATES = ("{a}", "a photo of {a}", "there is {a}", "{a} on a plain background")
# every word-level token a caption can contain ("objects:" splits into "objects" and ":")
VOCABULARY = sorted(
    set(COLOURS) | set(SHAPES)
    | set("a an and next to with two three four objects : beside photo of there is on plain background ,".split())
)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive of x1/y1


@dataclass(frozen=True)
class Phrase:
    text: str
    start: int  # character span in the caption
    end: int
    box: tuple[int, int, int, int]
    shape: str
    colour: str


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    caption: str = ""
    phrases: list[Phrase] = field(default_factory=list)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Mid-tone plain colour, or a texture of noise or stripes: never confusable with an object colour."""
    base = rng.integers(95, 165, size=3)
    kind = rng.choice(["plain", "noise", "stripes"], p=[0.5, 0.25, 0.25])
    pixels = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if kind == "noise":
        pixels = pixels + rng.normal(0, 14, size=(size, size, 1))
    elif kind == "stripes":
        period = rng.integers(6, 14)
        angle = rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:size, 0:size]
        wave = np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)
        pixels = pixels + 18 * wave[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.box
    colour = COLOURS[obj.colour]
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            radius = (w / 2 if k % 2 == 0 else w / 4.5)
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) * h / w))
        draw.polygon(points, fill=colour)
    elif obj.shape == "cross":
        t = max(2, w // 3)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1 - 1), fill=colour)
        draw.rectangle((x0, cy - t / 2, x1 - 1, cy + t / 2), fill=colour)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def draw_scene(rng: np.random.Generator, size: int = 64, max_objects: int = 4, shapes: Sequence[str] = SHAPES) -> Scene:
    """1..max_objects distinct (colour, shape) objects at random places, overlapping at most a little; their
    shapes drawn from ``shapes`` (a world without stars, for one)."""
    n_objects = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    lo, hi = round(size * 0.25), round(size * 0.42)
    for _ in range(200):
        if len(objects) == n_objects:
            break
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(shapes))
        if (colour, shape) in used:
            continue
        side = int(rng.integers(lo, hi + 1))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_overlap(box, o.box) > 0.1 for o in objects):
            continue
        objects.append(SceneObject(colour, shape, box))
        used.add((colour, shape))
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return Scene(image=image, objects=objects)


def _join(rng: np.random.Generator, phrases: list[str]) -> str:
    if len(phrases) == 1:
        return str(rng.choice(SINGLE_TEMPLATES)).format(a=phrases[0])
    if len(phrases) == 2:
        return str(rng.choice(PAIR_TEMPLATES)).format(a=phrases[0], b=phrases[1])
    head = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    count = {3: "three", 4: "four"}[len(phrases)]
    return head if rng.random() < 0.5 else f"{count} objects: {head}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(rng: np.random.Generator, mentioned: list[SceneObject]) -> tuple[str, list[Phrase]]:
    """A caption naming ``mentioned`` in order, with each object phrase's character span."""
    texts = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in mentioned]
    caption = _join(rng, texts)
    phrases, cursor = [], 0
    for obj in mentioned:
        text = f"{obj.colour} {obj.shape}"
        start = caption.index(text, cursor)
        phrases.append(Phrase(text, start, start + len(text), obj.box, obj.shape, obj.colour))
        cursor = start + len(text)
    return caption, phrases


def describe(rng: np.random.Generator, scene: Scene, mention_all: float = 0.7) -> Scene:
    """Caption the scene: all objects with probability ``mention_all``, else a random non-empty subset."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    if len(objects) > 1 and rng.random() > mention_all:
        objects = objects[: int(rng.integers(1, len(objects)))]
    caption, phrases = _caption(rng, objects)
    return Scene(image=scene.image, objects=scene.objects, caption=caption, phrases=phrases)


def hard_negative(rng: np.random.Generator, scene: Scene) -> str:
    """The caption with the colours of two mentioned objects of different shape and colour swapped, or, where
    no such pair exists, one mentioned object recoloured to a colour absent from the scene."""
    phrases = scene.phrases
    swappable = [
        (i, j)
        for i in range(len(phrases))
        for j in range(i + 1, len(phrases))
        if phrases[i].colour != phrases[j].colour and phrases[i].shape != phrases[j].shape
    ]
    if not swappable:
        present = {o.colour for o in scene.objects}
        k = int(rng.integers(len(phrases)))
        return _rewrite(scene, {k: (str(rng.choice([c for c in COLOURS if c not in present])), phrases[k].shape)})
    i, j = swappable[int(rng.integers(len(swappable)))]
    return _rewrite(scene, {i: (phrases[j].colour, phrases[i].shape), j: (phrases[i].colour, phrases[j].shape)})


def replacement_negative(rng: np.random.Generator, scene: Scene) -> str:
    """The caption with the colour or the shape of one mentioned object replaced, so that it names an object the
    scene does not hold while naming as many objects as the true caption: no counting shortcut tells them apart."""
    present = {(o.colour, o.shape) for o in scene.objects}
    k = int(rng.integers(len(scene.phrases)))
    colour, shape = scene.phrases[k].colour, scene.phrases[k].shape
    if rng.random() < 0.5:
        options = [(c, shape) for c in COLOURS if (c, shape) not in present]
    else:
        options = [(colour, s) for s in SHAPES if (colour, s) not in present]
    return _rewrite(scene, {k: options[int(rng.integers(len(options)))]})


def _rewrite(scene: Scene, replacements: dict[int, tuple[str, str]]) -> str:
    """The caption with phrase ``k`` (and its article) naming ``replacements[k]`` = (colour, shape) instead."""
    pieces, cursor = [], 0
    for k, phrase in enumerate(scene.phrases):
        colour, shape = replacements.get(k, (phrase.colour, phrase.shape))
        article_start = scene.caption.rfind(" ", 0, phrase.start - 1) + 1  # the word before: "a" or "an"
        pieces.append(f"{scene.caption[cursor:article_start]}{_article(colour)} {colour} {shape}")
        cursor = phrase.end
    return "".join(pieces) + scene.caption[cursor:]


def generate(n: int, *, seed: int, size: int = 64) -> list[Scene]:
    """``n`` captioned scenes, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [describe(rng, draw_scene(rng, size)) for _ in range(n)]


def write_scenes(scenes: list[Scene], folder: str | Path) -> Path:
    """Save images, ``metadata.jsonl`` (imagefolder: file_name, text) and ``annotations.jsonl`` (grounding)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata, annotations = [], []
    for number, scene in enumerate(scenes):
        name = f"scene{number:05d}.png"
        scene.image.save(folder / name)
        metadata.append(json.dumps({"file_name": name, "text": scene.caption}))
        phrases = [
            {"text": p.text, "start": p.start, "end": p.end, "boxes": [list(p.box)], "class": p.shape}
            for p in scene.phrases
        ]
        annotations.append(json.dumps({"image": name, "caption": scene.caption, "phrases": phrases}))
    (folder / "metadata.jsonl").write_text("\n".join(metadata) + "\n")
    (folder / "annotations.jsonl").write_text("\n".join(annotations) + "\n")
    return folder
