"""Does the reported map error bound hold? Per input and per pair, on demo-world scenes the bound was never tuned on.

    python scripts/map_error_coverage.py [--seeds 7301,7302,7303] [--scenes 32] [--dtypes float32,float64]

For every caption and image of the scenes (``xclip synth`` seeds; the bound's safety factors were chosen on seeds
31001-31002, the shipped layouts calibrated on seed 60000), the shipped demo model attributes at the default
tolerance with the default and with the calibrated panel layout, in each dtype. The truth is a float64 fixed
Gauss-Legendre rule of ``--reference-nodes`` nodes (1024 agrees with 512 to about 1e-14 on this model). Printed per
tower, layout and dtype: how often the actual relative Frobenius error ``|C - C_true| / |C_true|`` is within the
reported ``map_error_bound`` (coverage), the largest actual / bound, the largest of each, the forward passes per
input (integrand nodes plus panel edges) and the share of inputs within the tolerance. Then the same for the pair
maps of every caption with every image (the first dtype): coverage of the pair bound against the true map's
relative error, and how many pairs are marked inexact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import xclip
from xclip.attribution.engine import interaction_maps
from xclip.attribution.result import is_inexact_pair
from xclip.analysis.synthetic import generate

DEMO_MODEL = Path(__file__).resolve().parents[1] / "xclip" / "models" / "shapes-clip"
LAYOUTS = {"default": "default", "calibrated": "auto"}


def relative_errors(items: list[xclip.Contributions], truth: list[torch.Tensor]) -> np.ndarray:
    return np.array([float((item.values.double() - true).norm() / true.norm()) for item, true in zip(items, truth)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="7301,7302,7303", help="xclip synth seeds, comma-separated")
    parser.add_argument("--scenes", type=int, default=32, help="scenes per seed")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--reference-nodes", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scenes = [scene for seed in args.seeds.split(",") for scene in generate(args.scenes, seed=int(seed))]
    captions, images = [scene.caption for scene in scenes], [scene.image for scene in scenes]
    exact = xclip.InteractionAttribution(xclip.load_model(DEMO_MODEL, dtype="float64", device="cpu"), n_steps=args.reference_nodes)
    truth = {"text": [c.values for c in exact.text_contributions(captions)],
             "image": [c.values for c in exact.image_contributions(images)]}
    print(f"demo model, {len(captions)} captions and {len(images)} images (seeds {args.seeds}), tolerance 1e-3; "
          f"truth: float64 Gauss-Legendre, {args.reference_nodes} nodes\n")
    print("| tower | layout | dtype | inputs | bound holds | worst actual / bound | max actual | max bound | forward passes per input | within tolerance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pair_rows = []
    for k, dtype in enumerate(args.dtypes.split(",")):
        model = xclip.load_model(DEMO_MODEL, dtype=dtype, device="cpu")
        for layout, setting in LAYOUTS.items():
            attribution = xclip.InteractionAttribution(model, panel_layout=setting)
            towers = {"text": attribution.text_contributions(captions), "image": attribution.image_contributions(images)}
            for tower, items in towers.items():
                actual = relative_errors(items, truth[tower])
                bound = np.array([item.map_error_bound for item in items])
                passes = np.array([item.n_nodes + item.n_endpoints for item in items])
                print(f"| {tower} | {layout} | {dtype} | {len(items)} | {np.mean(actual <= bound):.1%} | "
                      f"{np.max(actual / bound):.2f} | {actual.max():.1e} | {bound.max():.1e} | {passes.mean():.2f} | "
                      f"{np.mean([item.is_converged for item in items]):.1%} |", flush=True)
            if k == 0:
                pair_rows.append((layout, dtype, pair_coverage(towers["text"], towers["image"], truth, attribution.tolerance)))
    print("\n| layout | dtype | pairs | pair bound holds | worst actual / bound | max actual | median bound | max bound | marked inexact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, dtype, row in pair_rows:
        print(f"| {layout} | {dtype} | {row['pairs']} | {row['coverage']:.1%} | {row['worst']:.2f} | {row['max_actual']:.1e} | "
              f"{row['median_bound']:.1e} | {row['max_bound']:.1e} | {row['inexact']} |")


def pair_coverage(text: list[xclip.Contributions], image: list[xclip.Contributions], truth: dict[str, list[torch.Tensor]],
                  tolerance: float | None) -> dict[str, float]:
    """The pair bound against the true maps of every caption x image pair."""
    pairs = [(i, j) for i in range(len(text)) for j in range(len(image))]
    actual, bound = [], []
    for (i, j), pair in zip(pairs, interaction_maps(text, image, pairs)):
        true = truth["text"][i] @ truth["image"][j].T
        actual.append(float((pair.interactions.double() - true).norm() / true.norm()))
        bound.append(pair.map_error_bound)
    actual_errors, bounds = np.array(actual), np.array(bound)
    return {"pairs": len(pairs), "coverage": float(np.mean(actual_errors <= bounds)), "worst": float(np.max(actual_errors / bounds)),
            "max_actual": float(actual_errors.max()), "median_bound": float(np.median(bounds)), "max_bound": float(bounds.max()),
            "inexact": int(sum(is_inexact_pair(b, tolerance) for b in bounds))}


if __name__ == "__main__":
    main()
