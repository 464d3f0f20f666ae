"""One geometry for every reader: patches lie where the processor put the pixels, a box covers patches by their
area's share, and render, evaluate and the viewer's page choose the same patches with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import assert_patches_where_the_processor_put_them, browser, caption_tokens, gradient, invoke

import xclip
from xclip.errors import ConfigError
from xclip.analysis.grounding import box_weights
from xclip.core.geometry import Preprocessing
from xclip.show.content import figure_content
from xclip.show.pairs import PairView
from xclip.show.viewer import _patch_rects_in_view

STATIC = Path(xclip.__file__).resolve().parent / "show" / "static"


@pytest.mark.parametrize("size", [(150, 90), (90, 150), (77, 33), (64, 64)])
def test_patches_lie_where_the_processor_put_them(model32, size):
    assert_patches_where_the_processor_put_them(model32, size)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("resize", ["native", "crop", "pad", "squash"])
def test_every_resize_puts_the_patches_where_its_geometry_says(model_dirs, family, resize):
    model = xclip.load_model(model_dirs[family], device="cpu", image_resize=resize)
    for size in [(150, 90), (90, 150)]:
        assert_patches_where_the_processor_put_them(model, size)
    geometry = model.preprocess_image(gradient(150, 90)).geometry
    squashes = resize == "squash" or (resize == "native" and family == "siglip")
    expected_box = {
        "crop": (30.0, 0.0, 120.0, 90.0),  # the centred 90 x 90 square
        "pad": (0.0, -30.0, 150.0, 120.0),  # the image centred on a 150 x 150 square
        "squash": (0.0, 0.0, 150.0, 90.0),
    }.get("squash" if squashes else resize)
    if expected_box is not None:
        assert geometry.crop_box == pytest.approx(expected_box, abs=0.6)  # within a processor's rounding
    seen = {"crop": 0.6, "pad": 1.0, "squash": 1.0}.get("squash" if squashes else resize, 32 / 53)
    assert geometry.seen_share == pytest.approx(seen, abs=0.01)


def test_the_model_view_of_a_padded_image_shows_the_padding():
    padded = Preprocessing((100, 50), (0.0, -25.0, 100.0, 75.0), (40, 40), (2, 2))
    view = np.asarray(padded.model_view(Image.new("RGB", (100, 50), (255, 0, 0)), fill=(0, 0, 255)))
    assert (view[:9, :, 2] == 255).all() and (view[31:, :, 2] == 255).all()  # rows 0-9 and 30-39: padding
    assert (view[11:29, :, 0] == 255).all() and (view[11:29, :, 2] == 0).all()  # rows 10-29: the image


def test_the_crop_box_of_resize_then_crop_and_of_squash(model_dirs):
    clip = xclip.load_model(model_dirs["clip"], device="cpu").preprocess_image(gradient(150, 90)).geometry
    # short side 90 -> 32: 150 -> int(32 * 150 / 90) = 53 wide, cropped to 32 from x = 10: original x 28.125..88.125
    assert clip.crop_box == pytest.approx((10 * 150 / 53, 0.0, 42 * 150 / 53, 90.0))
    siglip = xclip.load_model(model_dirs["siglip"], device="cpu").preprocess_image(gradient(150, 90)).geometry
    assert siglip.crop_box == (0.0, 0.0, 150.0, 90.0)  # squash: nothing cut off


SQUARE = Preprocessing((64, 64), (0.0, 0.0, 64.0, 64.0), (32, 32), (4, 4))  # 16 x 16 original pixels a patch
# 150 x 90 resized to 53 x 32 and cropped to 32 x 32 at x = 10: what CLIP's processor does
WIDE = Preprocessing.resize_then_crop((150, 90), (53, 32), (10, 0), (32, 32), (4, 4))


def test_a_box_covers_each_patch_by_the_share_of_its_area():
    weights = SQUARE.box_coverage((0, 0, 10, 10)).reshape(4, 4)  # a 10 x 10 box inside one 16 x 16 patch
    assert weights[0, 0] == pytest.approx(100 / 256) and weights.sum() == pytest.approx(100 / 256)
    weights = SQUARE.box_coverage((8, 8, 24, 24)).reshape(4, 4)  # a patch's area, straddling four patches
    assert weights[:2, :2] == pytest.approx(np.full((2, 2), 0.25)) and weights.sum() == pytest.approx(1.0)
    assert (SQUARE.box_coverage((0, 0, 64, 64)) == 1).all()
    assert SQUARE.box_coverage((16, 16, 32, 32)).tolist().count(1.0) == 1  # edges on patch borders: one patch
    assert list(np.flatnonzero(SQUARE.box_coverage((16, 16, 32, 32)))) == [5]


def test_a_box_outside_the_crop_is_refused_and_one_partly_outside_counts_its_part():
    x0, _, x1, _ = WIDE.crop_box
    with pytest.raises(ConfigError, match=r"lies wholly outside the part of the image the model sees"):
        WIDE.box_coverage((0, 0, x0 - 1, 90))
    with pytest.raises(ConfigError, match=r"wholly outside"):
        box_weights([[x1 + 1, 10, 150, 20]], WIDE)
    straddling = (x0 - 10, 0, x0 + 10, 90)
    assert WIDE.crop_share(straddling) == pytest.approx(0.5)
    weights = WIDE.box_coverage(straddling).reshape(4, 4)
    assert weights[:, 1:].sum() == 0 and weights[:, 0] == pytest.approx(np.full(4, 10 / ((x1 - x0) / 4)))


def box_grid(geometry: Preprocessing) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Boxes from 1 px to the whole image, inside, straddling and outside the crop."""
    width, height = geometry.original_size
    x0, y0, x1, y1 = geometry.crop_box
    boxes = [("whole image", (0.0, 0.0, float(width), float(height)))]
    for side in (1, 3, 10, 17, 40):
        for fx in (0.0, 0.3, 0.5, 0.9):
            for fy in (0.0, 0.45, 0.8):
                left, top = fx * (width - side), fy * (height - side)
                box = (left, top, left + side, top + side)
                inside = x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1
                outside = box[2] <= x0 or box[0] >= x1 or box[3] <= y0 or box[1] >= y1
                boxes.append(("outside the crop" if outside else "inside" if inside else "straddling the crop", box))
    return boxes


def render_coverage(geometry: Preprocessing, box: tuple[float, float, float, float]) -> np.ndarray:
    """What ``xclip render`` weighs each patch with: a figure of a map whose token k meets only patch k."""
    n = geometry.n_patches
    tokens = ["<s>", *[f"w{k}" for k in range(n)], "</s>"]
    interactions = np.zeros((n + 2, 1 + n))
    interactions[1 : n + 1, 1:] = np.eye(n)
    view = PairView("pair 0", "pair000000", caption_tokens(tokens), interactions, geometry, 1,
                    Image.new("RGB", geometry.input_size), 0.0, 0.0, 0.0)
    drawn = figure_content(view, None, box, frozenset())  # what a figure of the box colours its words with
    covered = int(next(note for note in drawn.notes if note.startswith("the box covers")).split()[3])
    values = np.array([value for _, _, value in drawn.words])
    assert covered == int((values > 0).sum())
    return values


@browser
def test_render_evaluate_and_the_viewer_choose_the_same_patches(driver):
    driver.get((STATIC / "index.html").as_uri())  # the page's own script, without data: its functions load
    page = (320, 200)
    for geometry in (SQUARE, WIDE):
        patches = _patch_rects_in_view(geometry)
        for kind, box in box_grid(geometry):
            if kind == "outside the crop":
                for choose in (geometry.box_coverage, lambda b: box_weights([list(b)], geometry), lambda b: render_coverage(geometry, b)):
                    with pytest.raises(ConfigError, match="wholly outside"):
                        choose(box)
                continue
            reference = geometry.box_coverage(box)
            assert (box_weights([list(box)], geometry) == reference).all()  # evaluate
            assert render_coverage(geometry, box) == pytest.approx(reference, abs=1e-12)  # render
            # the viewer: the same box dragged on the page's picture of the model's view
            (vx0, vy0), (vx1, vy1) = geometry.to_input(*box[:2]), geometry.to_input(*box[2:])
            sx, sy = page[0] / geometry.input_size[0], page[1] / geometry.input_size[1]
            dragged = {"x0": vx0 * sx, "y0": vy0 * sy, "x1": vx1 * sx, "y1": vy1 * sy}
            shown = driver.execute_script("return boxCoverage(arguments[0], arguments[1], arguments[2], arguments[3]);",
                                          dragged, patches, *page)
            assert np.array(shown) == pytest.approx(reference, abs=1e-9), (kind, box)


@pytest.mark.slow  # a run, a render and two evaluations
def test_render_and_evaluate_refuse_a_box_outside_the_crop(finished_run, tmp_path):
    # the run's images are 50 x 40: resized to 40 x 32 and cropped at x = 4, so the model sees x 5..45
    code, output = invoke("render", finished_run, "--pair", "0", "--box", "0,0,4,4")
    assert code == 2 and "lies wholly outside the part of the image the model sees (x 5..45" in " ".join(output.split())
    annotations = tmp_path / "annotations.jsonl"
    annotations.write_text(json.dumps({"image": "img0.png", "caption": "a red dog", "phrases": [
        {"text": "dog", "start": 6, "end": 9, "boxes": [[46, 0, 50, 40]]}]}) + "\n")
    code, output = invoke("evaluate", finished_run, "-a", annotations)  # its only box is outside: nothing to score
    assert code == 2 and "line 1: phrase 'dog': box 46,0,50,40 on img0.png lies wholly outside" in " ".join(output.split())
    # beside a phrase the model saw, the box is skipped and listed, and the other phrase is scored
    annotations.write_text(json.dumps({"image": "img0.png", "caption": "a red dog", "phrases": [
        {"text": "dog", "start": 6, "end": 9, "boxes": [[46, 0, 50, 40]]},
        {"text": "red", "start": 2, "end": 5, "boxes": [[10, 10, 30, 30]]}]}) + "\n")
    code, output = invoke("evaluate", finished_run, "-a", annotations, "--out", tmp_path / "report")
    assert code == 0 and "1 box(es) lie wholly outside" in " ".join(output.split())
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(b["phrase"], b["box"]) for b in report["skipped_boxes"]] == [("dog", [46, 0, 50, 40])]
    assert report["overall"]["n_phrases"] == 1
    # the first-order baselines skip the same box and score the same phrase (the box aborted them before)
    code, output = invoke("evaluate", finished_run, "-a", annotations, "--baselines", "random", "--out", tmp_path / "baselines")
    assert code == 0, output
    baselines = json.loads((tmp_path / "baselines" / "baselines.json").read_text())
    assert baselines["grounding"]["overall"]["random"]["pointing_game"]["n"] == 1, baselines["grounding"]["overall"]


def test_a_result_carries_its_tokens_and_geometry_through_save_and_load(tmp_path):
    model = xclip.load_model(Path(xclip.__file__).resolve().parent / "models" / "shapes-clip", dtype="float64", device="cpu")
    picture = gradient(96, 64)  # cropped to its middle 64 x 64 columns: x 16..80
    (pair,) = xclip.InteractionAttribution(model, n_steps=8).attribute(["a red circle, zebra"], [picture])
    tokens = pair.caption_tokens
    assert [w.text for w in tokens.words()] == ["a", "red", "circle", ",", "zebra"] and tokens.unknown_words() == ["zebra"]
    rows = [r for r, (a, b) in enumerate(tokens.offsets) if a >= 2 and b <= 12 and b > a]  # "red circle"
    assert torch_equal(pair.span("red circle"), pair.patch_maps[rows].sum(0))
    box = (10.0, 5.0, 40.0, 20.0)  # straddles the crop's left edge at x = 16
    weights = pair.geometry.box_coverage(box)
    assert 0 < weights[weights > 0].min() < 1 and (weights > 0).sum() >= 2  # some patches only in part
    expected = pair.interactions[:, 1:].numpy() @ weights
    assert np.allclose(pair.box(box).numpy(), expected, rtol=0, atol=1e-15)
    saved = pair.save(tmp_path / "pair.npz")
    loaded = xclip.InteractionMap.load(saved)
    assert loaded.caption_tokens == tokens and loaded.geometry == pair.geometry and loaded.score == pair.score
    assert torch_equal(loaded.interactions, pair.interactions) and torch_equal(loaded.box(box), pair.box(box))
    with np.load(saved, allow_pickle=False) as stored:  # plain arrays and JSON text: no pickled objects
        assert {name: stored[name].dtype.kind for name in stored.files} == {"interactions": "f", "terms": "f", "meta": "U"}


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_the_padding_mask_covers_the_padding_and_its_edge_only():
    padded = Preprocessing((100, 50), (0.0, -25.0, 100.0, 75.0), (40, 40), (2, 2))  # 25 px of padding above and below
    margin = 2 + 1  # at 100 pixels: the detector's blur and step (what outline_mask passes)
    mask = padded.padding_mask((100, 100), margin=margin)  # one view pixel per original pixel
    assert mask[: 25 + margin].all() and mask[75 - margin :].all()
    assert not mask[25 + margin : 75 - margin].any()
    # crops have no padding
    assert not SQUARE.padding_mask((64, 64), margin=margin).any() and not WIDE.padding_mask((32, 32), margin=margin).any()
