"""Figures that cannot mislead: colour means the map's value only, scales can be shared, formats open, and
the API draws what `xclip render` draws."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
from conftest import plant_map
import pytest
from matplotlib import colormaps
from matplotlib.colors import CenteredNorm
from PIL import Image
from test_bad_inputs import finished_run, invoke  # noqa: F401  (finished_run is a fixture)

import xclip
from xclip.errors import ConfigError
from xclip.geometry import Preprocessing
from xclip.render import FigureOptions, PairView, draw, figure, map_colours
from xclip.tokens import CaptionTokens

GRID = (4, 4)


SPECIAL = {"<|startoftext|>", "<|endoftext|>", "<s>", "</s>"}


def caption_tokens(tokens: list[str], words: dict[str, str] | None = None) -> CaptionTokens:
    """A caption of the given tokens, a word each (``words`` names what an unknown token stood for)."""
    words = words or {}
    caption, offsets = "", []
    for token in tokens:
        if token in SPECIAL:
            offsets.append((0, 0))
            continue
        text = words.get(token, token.removesuffix("</w>"))
        start = len(caption) + (1 if caption else 0)
        caption = f"{caption} {text}" if caption else text
        offsets.append((start, len(caption)))
    return CaptionTokens(caption, tokens, offsets, [t in SPECIAL for t in tokens], [t == "<unk>" for t in tokens])


def planted_view(image: Image.Image, token_values: dict[str, np.ndarray], tokens: list[str] | None = None,
                 words: dict[str, str] | None = None) -> PairView:
    """A pair whose map is hand-made: ``token_values`` gives each listed token's 4 x 4 patch values."""
    tokens = tokens or ["<|startoftext|>", *token_values, "<|endoftext|>"]
    interactions = np.zeros((len(tokens), 1 + GRID[0] * GRID[1]))
    for token, values in token_values.items():
        interactions[tokens.index(token), 1:] = np.asarray(values, dtype=float).reshape(-1)
    geometry = Preprocessing(image.size, (0.0, 0.0, *map(float, image.size)), image.size, GRID)
    return PairView(title="pair 0", name="pair000000", tokens=caption_tokens(tokens, words), interactions=interactions,
                    geometry=geometry, n_prefix=1, image=image, score=0.3, four_term_value=0.2, completeness_error=1e-6)


def reference_colour(value: float, halfrange: float) -> np.ndarray:
    """matplotlib's own colour of ``value`` on a centred RdBu_r scale: what its colour bar shows."""
    return np.asarray(colormaps["RdBu_r"](CenteredNorm(vcenter=0.0, halfrange=halfrange)(value), bytes=True)[:3])


def count(picture: Image.Image | np.ndarray, colour: np.ndarray) -> int:
    return int((np.asarray(picture)[..., :3] == colour).all(-1).sum())


def red_and_blue(side: int = 64) -> Image.Image:
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[:, : side // 2] = (230, 20, 20)
    pixels[:, side // 2 :] = (20, 20, 230)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("value", [0.5, -0.25, 0.0])
def test_map_colours_depend_on_the_value_not_on_the_image(value):
    # one value under a red object and a blue one: the whole panel takes the colour bar's colour of the value
    view = planted_view(red_and_blue(), {"red</w>": np.full(GRID, value)})
    picture = draw(view, span="red", options=FigureOptions(scale=1.0)).picture
    panel = 200 * 200
    expected = reference_colour(value, 1.0)
    assert (map_colours(np.array(value), 1.0) == expected).all()
    # all of the map panel but the contour between the two halves (a few pixels wide) has that colour
    assert panel - 200 * 6 <= count(picture, expected) <= panel
    # the image itself is shown beside the map, in its own colours
    assert count(picture, np.array([230, 20, 20])) > 0.45 * panel


def test_planted_patches_take_their_values_colours_at_any_position():
    values = np.array([[1.0, 0.5, 0.0, -0.5], [-1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.25, 0.0, 0.0, 0.0]])
    view = planted_view(red_and_blue(), {"dog</w>": values})
    picture = np.asarray(draw(view, span="dog", options=FigureOptions(upsample="nearest")).picture)
    for value in (1.0, 0.5, -0.5, -1.0, 0.25):  # each planted patch: a 50 x 50 square of its exact colour
        assert count(picture, reference_colour(value, 1.0)) >= 50 * 50 - 4 * 50, value


def test_unknown_tokens_are_noted_by_their_words_and_stop_words_get_no_panel():
    tokens = ["<s>", "a", "<unk>", "dog", "</s>"]
    view = planted_view(red_and_blue(), {"<unk>": np.ones(GRID), "dog": np.ones(GRID)}, tokens=tokens, words={"<unk>": "zebra"})
    drawn = draw(view)
    assert any("zebra: unknown to the tokenizer" in note for note in drawn.notes)  # the caption's word, not <unk>
    assert any(note.startswith("no panel for a ") for note in drawn.notes)
    everything = draw(view, options=FigureOptions(skip_words=frozenset()))
    # one more panel ("a"), in the same row
    assert everything.picture.size[0] == drawn.picture.size[0] + 200 + 12 and not any("no panel" in n for n in everything.notes)


def plant(run_dir: Path, pair: int, token: str, patch_values: np.ndarray) -> None:
    with h5py.File(run_dir / "run.h5", "r+") as f:
        caption = int(f["pairs/caption_index"][pair])
        tokens = list(f["captions/tokens"].asstr()[caption, : f["captions/n_positions"][caption]])
        planted = np.zeros_like(f["pairs/interactions"][pair])
        planted[tokens.index(token), 1:] = np.asarray(patch_values, dtype=np.float32).reshape(-1)
        plant_map(f, pair, planted)


def render(*arguments) -> tuple[list[Path], str]:
    code, output = invoke("render", *arguments)
    assert code == 0, output
    return [Path(line) for line in output.split() if line.endswith((".png", ".svg", ".pdf"))], output


def halfrange(path: Path) -> float:
    with Image.open(path) as png:
        return float(png.text["xclip:halfrange"])


def test_a_run_scale_gives_equal_values_equal_colours(finished_run, tmp_path):  # noqa: F811
    corner = np.zeros(GRID)
    corner[0, 0] = 1.0
    plant(finished_run, 0, "red</w>", 2 * corner)  # pairs 0 and 2 hold "red": their maps peak at 2 and at 1
    plant(finished_run, 2, "red</w>", corner)
    own = render(finished_run, "--span", "red", "--out", tmp_path / "own", "--upsample", "nearest")[0]
    shared = render(finished_run, "--span", "red", "--out", tmp_path / "shared", "--upsample", "nearest", "--scale", "run")[0]
    assert [halfrange(p) for p in own] == [2.0, 1.0]
    assert [halfrange(p) for p in shared] == [2.0, 2.0]
    with Image.open(shared[1]) as second, Image.open(own[1]) as alone:
        # the value 1 is drawn in the colour the value 1 has on the shared scale, not in its own scale's top
        # (contours of the test's noise image cover at most a tenth of the patch)
        assert count(second.convert("RGB"), reference_colour(1.0, 2.0)) >= 0.85 * 50 * 50
        assert count(alone.convert("RGB"), reference_colour(1.0, 2.0)) < 200  # its few pixels in the colour bars
    fixed, output = render(finished_run, "--span", "red", "--out", tmp_path / "fixed", "--scale", "0.5", "--pair", "0")
    assert halfrange(fixed[0]) == 0.5 and "map values reach ±2, beyond the fixed scale ±0.5" in " ".join(output.split())


def test_a_span_over_many_pairs_skips_and_counts_the_pairs_without_it(finished_run, tmp_path):  # noqa: F811
    written, output = render(finished_run, "--span", "blue", "--out", tmp_path)
    assert [p.name for p in written] == ["pair000001_span-blue.png"]
    assert "skipped 2 pairs whose caption does not hold 'blue'" in output


def test_svg_and_pdf_keep_text_as_text_and_the_maps_pixels(finished_run, tmp_path):  # noqa: F811
    from xclip.render import load_pair_view
    from xclip.store import RunReader

    (png,) = render(finished_run, "--pair", "0", "--out", tmp_path / "png", "--dpi", "120")[0]
    (svg,) = render(finished_run, "--pair", "0", "--out", tmp_path / "svg", "--format", "svg", "--dpi", "120")[0]
    (pdf,) = render(finished_run, "--pair", "0", "--out", tmp_path / "pdf", "--format", "pdf", "--dpi", "120")[0]
    with Image.open(png) as picture:
        size, dpi = picture.size, picture.info["dpi"]
    assert round(dpi[0]) == 120
    with RunReader(finished_run) as run:  # the same figure through the API: what the files must hold
        drawn = draw(load_pair_view(run, 0, run.data_root()), options=FigureOptions(dpi=120))
    pictures = [item[2] for item in drawn.drawn if item[0] == "image"]
    svg_ns, link = "{http://www.w3.org/2000/svg}", "{http://www.w3.org/1999/xlink}href"
    root = ET.parse(svg).getroot()
    assert root.tag == f"{svg_ns}svg" and float(root.get("width").removesuffix("pt")) == pytest.approx(size[0] * 72 / 120)
    texts = ["".join(t.itertext()) for t in root.iter(f"{svg_ns}text")]
    assert texts[0].startswith("pair 0: score") and "“a red dog”" in texts and {"red", "dog"} <= set(texts)
    assert "xclip:halfrange=" in ET.tostring(root, encoding="unicode")
    embedded = [Image.open(io.BytesIO(base64.b64decode((e.get(link) or e.get("href")).split(",", 1)[1]))).convert("RGB")
                for e in root.iter(f"{svg_ns}image")]
    # the image, each map panel and both colour bars, pixel for pixel as in the PNG
    assert len(embedded) == len(pictures)
    for ours, theirs in zip(pictures, embedded):
        assert (np.asarray(ours.convert("RGB")) == np.asarray(theirs)).all()
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert b"/FontFile2" in data and b"DejaVuSans" in data  # text set in an embedded TrueType font, not pixels
    assert len(re.findall(rb"/Subtype\s*/Image", data)) == len(pictures)


def test_the_api_draws_what_render_draws(finished_run, tmp_path, model_dirs):  # noqa: F811
    (rendered,) = render(finished_run, "--pair", "0", "--span", "red", "--out", tmp_path)[0]
    model = xclip.load_model(model_dirs["clip"], dtype="float32")
    attributor = xclip.InteractionAttribution(model, n_steps=2, tolerance=None)
    image = Image.open(finished_run.parent / "images" / "img0.png")
    (caption,) = attributor.text_contributions(["a red dog"])
    (picture,) = attributor.image_contributions([image])
    result = xclip.interaction_map(caption, picture)
    drawn = figure(result, image, span="red", title="pair 0")
    with Image.open(rendered) as from_run:
        same = (np.asarray(from_run.convert("RGB")) == np.asarray(drawn.picture)).all(-1)
    assert same.mean() > 0.999  # float32 storage may move a colour to its neighbouring level at a few pixels
    saved = drawn.save(tmp_path / "api.png")
    assert halfrange(saved) == pytest.approx(halfrange(rendered), rel=1e-5)
    with pytest.raises(ConfigError, match="not inside the image"):
        figure(result, image, box=(0, 0, 500, 500))
    with pytest.raises(ConfigError, match="does not occur in the caption"):
        figure(result, image, span="zebra")
