"""Which patches render, evaluate and the viewer's page give a box: a table over boxes from 1 px to the whole
image, inside, straddling and outside the centre crop, for a square and a wide image; and how many of them a
patch-centre rule (a patch counts when its centre lies in the box) would give no patch at all.

    python scripts/box_agreement.py        # the viewer's column needs Debian's chromium and chromium-driver
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

import xclip
from xclip.errors import ConfigError
from xclip.analysis.grounding import box_weights
from xclip.core.geometry import Preprocessing
from xclip.show.content import figure_content
from xclip.show.pairs import PairView
from xclip.core.tokens import CaptionTokens
from xclip.show.viewer import _patch_rects_in_view

GEOMETRIES = {
    "square 64 x 64": Preprocessing((64, 64), (0.0, 0.0, 64.0, 64.0), (32, 32), (4, 4)),
    "wide 150 x 90 (CLIP crop)": Preprocessing.resize_then_crop((150, 90), (53, 32), (10, 0), (32, 32), (4, 4)),
}
PAGE = (320, 200)  # the viewer's picture of the model's view, in page pixels


def boxes(geometry: Preprocessing) -> list[tuple[str, tuple[float, float, float, float]]]:
    width, height = geometry.original_size
    x0, y0, x1, y1 = geometry.crop_box
    found = [("whole image", (0.0, 0.0, float(width), float(height)))]
    for side in (1, 3, 10, 17, 40):
        for fx in np.linspace(0, 1, 7):
            for fy in np.linspace(0, 1, 5):
                left, top = fx * (width - side), fy * (height - side)
                box = (left, top, left + side, top + side)
                outside = box[2] <= x0 or box[0] >= x1 or box[3] <= y0 or box[1] >= y1
                inside = x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1
                found.append((f"{side} px, " + ("outside the crop" if outside else "inside" if inside else "straddling"), box))
    return found


def render_weights(geometry: Preprocessing, box: tuple[float, float, float, float]) -> np.ndarray:
    """The words' values of ``xclip render --box`` on a map whose word k meets patch k alone."""
    n = geometry.n_patches
    offsets = [(0, 0), *[(3 * k, 3 * k + 2) for k in range(n)], (0, 0)]
    tokens = CaptionTokens(" ".join(f"{k:02d}" for k in range(n)), ["s", *(["w"] * n), "e"], offsets,
                           [True, *[False] * n, True], [False] * (n + 2))
    interactions = np.zeros((n + 2, 1 + n))
    interactions[1 : n + 1, 1:] = np.eye(n)
    view = PairView("pair", "pair", tokens, interactions, geometry, 1, Image.new("RGB", geometry.input_size), 0.0, 0.0, 0.0)
    drawn = figure_content(view, None, box, frozenset())  # what a figure of the box colours its words with
    return np.array([value for _, _, value in drawn.words])


def centre_rule_is_empty(geometry: Preprocessing, box: tuple[float, float, float, float]) -> bool:
    centres = geometry.patch_rects().reshape(-1, 2, 2).mean(1)
    return not ((centres[:, 0] >= box[0]) & (centres[:, 0] <= box[2]) & (centres[:, 1] >= box[1]) & (centres[:, 1] <= box[3])).any()


def browser():  # noqa: ANN201
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.get((Path(xclip.__file__).resolve().parent / "show" / "static" / "index.html").as_uri())
    return driver


def main() -> None:
    driver = browser()
    print(f"{'image':28} {'boxes':30} {'n':>3} {'render = evaluate':>18} {'viewer = evaluate':>18} {'centre rule: no patch':>22}")
    try:
        for label, geometry in GEOMETRIES.items():
            rows: Counter = Counter()
            for kind, box in boxes(geometry):
                group = kind.split(", ")[-1] if ", " in kind else kind
                rows[group, "n"] += 1
                try:
                    reference = box_weights([list(box)], geometry)
                except ConfigError:
                    refused = 0
                    for choose in (lambda b: render_weights(geometry, b), geometry.box_coverage):
                        try:
                            choose(box)
                        except ConfigError:
                            refused += 1
                    rows[group, "render"] += refused == 2
                    continue
                rows[group, "render"] += bool(np.allclose(render_weights(geometry, box), reference, rtol=0, atol=1e-12))
                if driver is not None:
                    (vx0, vy0), (vx1, vy1) = geometry.to_input(*box[:2]), geometry.to_input(*box[2:])
                    sx, sy = PAGE[0] / geometry.input_size[0], PAGE[1] / geometry.input_size[1]
                    shown = driver.execute_script("return boxCoverage(arguments[0], arguments[1], arguments[2], arguments[3]);",
                                                  {"x0": vx0 * sx, "y0": vy0 * sy, "x1": vx1 * sx, "y1": vy1 * sy},
                                                  _patch_rects_in_view(geometry), *PAGE)
                    rows[group, "viewer"] += bool(np.allclose(shown, reference, rtol=0, atol=1e-9))
                rows[group, "centre"] += centre_rule_is_empty(geometry, box)
            for group in dict.fromkeys(g for g, _ in rows):
                n = rows[group, "n"]
                if group == "outside the crop":  # refused by render and evaluate; the page draws on the view only
                    refused = f"{rows[group, 'render']}/{n} refused"
                    print(f"{label:28} {group:30} {n:>3} {refused:>18} {'-':>18} {'-':>22}")
                    continue
                render, centre = f"{rows[group, 'render']}/{n}", f"{rows[group, 'centre']}/{n}"
                viewer = f"{rows[group, 'viewer']}/{n}" if driver is not None else "(no browser)"
                print(f"{label:28} {group:30} {n:>3} {render:>18} {viewer:>18} {centre:>22}")
    finally:
        if driver is not None:
            driver.quit()


if __name__ == "__main__":
    main()
