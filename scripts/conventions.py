"""Completeness error of the exact and the reference convention, per quadrature rule.

    python scripts/conventions.py [--model random|demo] [--n-steps 10]

Prints the mean relative completeness error of the pair maps, |sum(A) - four-term value| over the largest the
four-term value can be (|g(x_a) - g(r_a)| |g(x_b) - g(r_b)|), for every caption with every image: 3 captions x 4
random images on a tiny random-weight CLIP, or the 12 x 12 demo scenes on the shipped demo model; in float64.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from convergence import DEMO_MODEL, demo_inputs
from PIL import Image

import xclip
from xclip.models.random_models import save_random_model

CAPTIONS = ["a red dog", "two blue circle and a square", "the cat on the green square"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random", choices=["random", "demo"])
    parser.add_argument("--n-steps", type=int, default=10)
    args = parser.parse_args()
    if args.model == "demo":
        model = xclip.load_model(DEMO_MODEL, dtype="float64", device="cpu")
        captions, images = demo_inputs()
    else:
        rng = np.random.default_rng(0)
        images = [Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")) for _ in range(4)]
        captions = CAPTIONS
        with tempfile.TemporaryDirectory() as directory:
            model = xclip.load_model(save_random_model(directory, "clip"), dtype="float64", device="cpu")
    print(f"{args.model} model: mean relative completeness error of {len(captions) * len(images)} pair maps")
    print(f"{'convention':<10} {'rule':<15} N={args.n_steps}")
    for convention in ("exact", "reference"):
        for rule in ("gauss-legendre", "midpoint", "riemann-right"):
            attributor = xclip.InteractionAttribution(
                model, n_steps=args.n_steps, rule=rule, convention=convention, tolerance=None
            )
            errors = [m.relative_completeness_error for m in attributor.attribute(captions, images)]
            print(f"{convention:<10} {rule:<15} {np.mean(errors):.1e}")
    maps = xclip.InteractionAttribution(model).attribute(captions, images)
    print(f"{'exact':<10} {'adaptive':<15} {np.mean([m.relative_completeness_error for m in maps]):.1e}")


if __name__ == "__main__":
    main()
