"""How the quadrature converges per input: fixed Gauss-Legendre rules against the adaptive rule, with the default
and with the model's calibrated panel layout.

    python scripts/convergence.py [--model demo|random] [--inputs demo|held-out] [--dtype float64|float32]

``--inputs demo``: the twelve demo scenes' captions and images. ``--inputs held-out``: 48 scenes of the demo's
world that nothing was tuned on (``xclip synth`` seeds 7301, 7302 and 7303, 16 each; the shipped layouts were
calibrated on seed 60000, the map error bound's safety factors chosen on seeds 31001 and 31002). ``--model random``: twelve random images and captions through a tiny random-weight CLIP.

For each rule and tower, prints the nodes per input (mean / max), the panel edges evaluated (plain forward passes,
mean), the forward passes per input (nodes plus edges, mean), the relative completeness error
|sum C - (g(x) - g(r))| / |g(x) - g(r)| (max), how far each input's contributions are from a converged 512-node rule
(relative Frobenius error, max), the rule's map error bound (max) and the share of inputs whose distance is within
their bound (adaptive rules; a fixed rule has no bound).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import xclip
from xclip.models.random_models import save_random_model
from xclip.analysis.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "xclip" / "models" / "shapes-clip"
RANDOM_CAPTIONS = ["a red dog", "two blue circle and a square", "the cat on the green square", "a photo of two dog"]
HELD_OUT_SEEDS = (7301, 7302, 7303)


def demo_inputs() -> tuple[list[str], list[Path]]:
    scenes = ROOT / "configs" / "demo" / "scenes"
    rows = [json.loads(line) for line in (scenes / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows], [scenes / row["file_name"] for row in rows]


def held_out_inputs() -> tuple[list[str], list[Image.Image]]:
    scenes = [scene for seed in HELD_OUT_SEEDS for scene in generate(16, seed=seed)]
    return [scene.caption for scene in scenes], [scene.image for scene in scenes]


def random_inputs() -> tuple[list[str], list[Image.Image]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")) for _ in range(12)]
    return [RANDOM_CAPTIONS[i % len(RANDOM_CAPTIONS)] for i in range(12)], images


def tower_inputs(attributor: xclip.InteractionAttribution, captions, images) -> dict[str, list[xclip.Contributions]]:
    return {"text": attributor.text_contributions(captions), "image": attributor.image_contributions(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=["demo", "random"])
    parser.add_argument("--inputs", default="demo", choices=["demo", "held-out"])
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    if args.model == "demo":
        model = xclip.load_model(DEMO_MODEL, dtype=args.dtype, device="cpu")
        captions, images = demo_inputs() if args.inputs == "demo" else held_out_inputs()
    else:
        with tempfile.TemporaryDirectory() as directory:
            model = xclip.load_model(save_random_model(directory, "clip"), dtype=args.dtype, device="cpu")
        captions, images = random_inputs()
    converged = tower_inputs(xclip.InteractionAttribution(model, n_steps=512), captions, images)
    rules: dict[str, dict[str, object]] = {f"N = {n}": {"n_steps": n} for n in (10, 20, 40, 80)}
    rules["adaptive, default layout"] = {"panel_layout": "default"}
    calibrated = xclip.InteractionAttribution(model).panel_layout
    if calibrated.is_calibrated:
        rules["adaptive, calibrated"] = {"panel_layout": calibrated}
    source = args.inputs if args.model == "demo" else "random"
    print(f"{args.model} model, {args.dtype}, {len(captions)} captions and {len(images)} images ({source})")
    print(f"{'rule':<26} {'tower':<6} {'nodes mean/max':>15} {'edges':>6} {'passes':>7} {'rel. error max':>15} "
          f"{'map error max':>14} {'bound max':>10} {'bound holds':>12}")
    for name, settings in rules.items():
        towers = tower_inputs(xclip.InteractionAttribution(model, **settings), captions, images)
        for tower, items in towers.items():
            nodes = [item.n_nodes for item in items]
            distance = [
                float((item.values - exact.values).norm() / exact.values.norm())
                for item, exact in zip(items, converged[tower])
            ]
            edges = [item.n_endpoints for item in items]
            bounds = np.array([item.map_error_bound for item in items])
            holds = "-" if np.isnan(bounds).any() else f"{np.mean(np.array(distance) <= bounds):.0%}"
            print(
                f"{name:<26} {tower:<6} {np.mean(nodes):>9.1f} / {max(nodes):<3d} {np.mean(edges):>6.1f} "
                f"{np.mean(nodes) + np.mean(edges):>7.1f} "
                f"{max(item.relative_completeness_error for item in items):>15.1e} {max(distance):>14.1e} "
                f"{bounds.max():>10.1e} {holds:>12}"
            )


if __name__ == "__main__":
    main()
