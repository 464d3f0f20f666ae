"""Is an input's result the same whatever else is in its batch? The demo model, adaptive rule at default settings.

    python scripts/batch_invariance.py [--seed 7301] [--scenes 16]

Attributes the captions and images of ``--scenes`` held-out demo scenes (``xclip synth`` seed ``--seed``) all in one
batch and one by one, in float32 and float64, and prints per tower and dtype: whether every input took the same
nodes and panel edges (the adaptive rule's decisions depend on the input alone), how many results are bitwise
equal, and the largest relative Frobenius difference. Differences come from BLAS kernels that sum in another
order for another batch size; which kernel is picked depends on the CPU and the library build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import xclip
from xclip.analysis.synthetic import generate

DEMO_MODEL = Path(__file__).resolve().parents[1] / "xclip" / "models" / "shapes-clip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7301)
    parser.add_argument("--scenes", type=int, default=16)
    args = parser.parse_args()
    scenes = generate(args.scenes, seed=args.seed)
    inputs = {"text": [scene.caption for scene in scenes], "image": [scene.image for scene in scenes]}
    print(f"demo model, {args.scenes} captions and images (seed {args.seed}), adaptive rule, tolerance 1e-3")
    print("| tower | dtype | same nodes and edges | bitwise equal | max relative difference |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "float64"):
        attributor = xclip.InteractionAttribution(xclip.load_model(DEMO_MODEL, dtype=dtype, device="cpu"))
        for tower, items in inputs.items():
            attribute = attributor.text_contributions if tower == "text" else attributor.image_contributions
            batched = attribute(items)
            alone = [attribute([item])[0] for item in items]
            same_cost = all((a.n_nodes, a.n_endpoints) == (b.n_nodes, b.n_endpoints) for a, b in zip(batched, alone))
            bitwise = sum(torch.equal(a.values, b.values) for a, b in zip(batched, alone))
            difference = max(float((a.values - b.values).norm() / b.values.norm()) for a, b in zip(batched, alone))
            print(f"| {tower} | {dtype} | {'yes' if same_cost else 'no'} | {bitwise} / {len(items)} | {difference:.1e} |")


if __name__ == "__main__":
    main()
