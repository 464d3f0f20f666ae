"""How the quadrature converges per input: fixed Gauss-Legendre rules against the adaptive rule.

    python scripts/convergence.py [--model demo|random] [--dtype float64|float32]

For each caption and image of the twelve demo scenes (``demo``: the shipped, trained demo model) or of twelve
random images and captions (``random``: a tiny random-weight CLIP), prints per tower the relative completeness
error |sum C - (g(x) - g(r))| / |g(x) - g(r)| (mean and max), the nodes spent, and how far each input's
contributions are from a converged 256-node rule (relative L2, median and max).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import xclip
from xclip.core.quadrature import DEFAULT_TOLERANCE
from xclip.random_models import save_random_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "xclip" / "models" / "shapes-clip"
RANDOM_CAPTIONS = ["a red dog", "two blue circle and a square", "the cat on the green square", "a photo of two dog"]


def demo_inputs() -> tuple[list[str], list[Path]]:
    scenes = ROOT / "configs" / "demo" / "scenes"
    rows = [json.loads(line) for line in (scenes / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows], [scenes / row["file_name"] for row in rows]


def random_inputs() -> tuple[list[str], list[Image.Image]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")) for _ in range(12)]
    return [RANDOM_CAPTIONS[i % len(RANDOM_CAPTIONS)] for i in range(12)], images


def tower_inputs(attributor: xclip.InteractionAttribution, captions, images) -> dict[str, list[xclip.Contributions]]:
    return {"text": attributor.text_contributions(captions), "image": attributor.image_contributions(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=["demo", "random"])
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    if args.model == "demo":
        model = xclip.load_model(DEMO_MODEL, dtype=args.dtype, device="cpu")
        captions, images = demo_inputs()
    else:
        with tempfile.TemporaryDirectory() as directory:
            model = xclip.load_model(save_random_model(directory, "clip"), dtype=args.dtype, device="cpu")
        captions, images = random_inputs()
    converged = tower_inputs(xclip.InteractionAttribution(model, n_steps=256), captions, images)
    rules = {f"N = {n}": {"n_steps": n} for n in (10, 20, 40, 80)}
    rules[f"adaptive {DEFAULT_TOLERANCE:g}"] = {}
    print(f"{args.model} model, {args.dtype}, {len(captions)} captions and {len(images)} images")
    print(f"{'rule':<16} {'tower':<6} {'nodes mean/max':>15} {'rel. error mean':>16} {'max':>9} {'map L2 median':>14} {'max':>9}")
    for name, settings in rules.items():
        towers = tower_inputs(xclip.InteractionAttribution(model, **settings), captions, images)
        for tower, items in towers.items():
            nodes = [item.n_nodes for item in items]
            relative = [item.relative_completeness_error for item in items]
            distance = [
                float((item.values - exact.values).norm() / exact.values.norm())
                for item, exact in zip(items, converged[tower])
            ]
            print(
                f"{name:<16} {tower:<6} {np.mean(nodes):>9.1f} / {max(nodes):<3d} {np.mean(relative):>16.1e} "
                f"{max(relative):>9.1e} {np.median(distance):>14.1e} {max(distance):>9.1e}"
            )


if __name__ == "__main__":
    main()
