"""Regenerate the shipped demo: a tiny random CLIP in xclip/models/tiny-random-clip and a folder of scenes.

    python scripts/make_demo.py

The model is randomly initialised (seeded): it exercises the whole pipeline offline, but its maps carry no
meaning. The scenes are coloured shapes on plain backgrounds with captions in ``metadata.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from xclip.random_models import save_random_model

ROOT = Path(__file__).resolve().parents[1]
SCENES = [
    ("red circle", "white", [("red", "circle", (20, 30, 90, 100))], "a red circle"),
    ("blue square", "white", [("blue", "square", (70, 20, 140, 90))], "a blue square"),
    ("two shapes", "black", [("green", "square", (10, 10, 70, 70)), ("red", "circle", (90, 80, 150, 140))],
     "a green square and a red circle"),
    ("cat and dog", "white", [("blue", "circle", (30, 60, 80, 110)), ("green", "circle", (100, 20, 150, 70))],
     "two blue circle next to the cat"),
]


def main() -> None:
    save_random_model(ROOT / "xclip" / "models" / "tiny-random-clip", "clip", "tiny", seed=0, initializer_factor=0.5)
    images = ROOT / "configs" / "demo" / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, (_, background, shapes, caption) in enumerate(SCENES):
        image = Image.new("RGB", (160, 150), background)
        draw = ImageDraw.Draw(image)
        for colour, shape, box in shapes:
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        name = f"scene{number}.png"
        image.save(images / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
