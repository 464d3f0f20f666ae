"""Completeness error of the exact and the reference convention, per quadrature rule, on a tiny random CLIP.

    python scripts/conventions.py [--n-steps 10]

Prints the mean relative completeness error |sum(A) - four-term value| / |four-term value| over 12 pairs.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from PIL import Image

import xclip
from xclip.random_models import save_random_model

CAPTIONS = ["a red dog", "two blue circle and a square", "the cat on the green square"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-steps", type=int, default=10)
    parser.add_argument("--family", default="clip", choices=["clip", "siglip"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")) for _ in range(4)]
    with tempfile.TemporaryDirectory() as directory:
        model = xclip.load_model(save_random_model(directory, args.family), dtype="float64", device="cpu")
    print(f"{'convention':<10} {'rule':<15} relative completeness error (N={args.n_steps})")
    for convention in ("exact", "reference"):
        for rule in ("gauss-legendre", "midpoint", "riemann-right"):
            attributor = xclip.InteractionAttribution(model, n_steps=args.n_steps, method=rule, convention=convention)
            maps = attributor.attribute(CAPTIONS, images)
            errors = [m.completeness_error / abs(m.four_term_value) for m in maps]
            print(f"{convention:<10} {rule:<15} {np.mean(errors):.1e}")


if __name__ == "__main__":
    main()
