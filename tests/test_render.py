"""Figures that cannot mislead: colour means the map's value only, scales can be shared, formats open, and
the API draws what `xclip render` draws."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from dataclasses import replace

import h5py
from helpers import caption_tokens, invoke, plant_map
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import CenteredNorm
from PIL import Image, ImageDraw

import xclip
from xclip.show.colours import CONTOUR, map_colours, outline_mask
from xclip.errors import ConfigError
from xclip.core.geometry import Preprocessing
from xclip.show.canvas import Canvas
from xclip.show.figures import CROP, FigureOptions, draw, figure
from xclip.show.pairs import PairView
from xclip.show.text import dejavu_sans, panel_title_fitting

GRID = (4, 4)


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


def texts_of(drawn) -> list[str]:
    return [item[2] for item in drawn.drawn if item[0] == "text"]


def panel_titles(drawn) -> list[str]:
    """The words that got a map panel: titles read "word: sum"."""
    return [text.rsplit(": ", 1)[0] for text in texts_of(drawn) if re.fullmatch(r".+: [+-]\S+", text)]


def test_unknown_words_are_named_with_their_token_and_stop_words_get_a_quoted_note():
    tokens = ["<s>", "a", "<unk>", "dog", ",", "and", "cat", "</s>"]
    values = {token: np.ones(GRID) for token in ("<unk>", "dog", "cat")}
    view = planted_view(red_and_blue(), values, tokens=tokens, words={"<unk>": "zebra"})
    drawn = draw(view)
    # the caption's word, and the token the model read instead
    assert any(note.startswith("zebra: unknown to the tokenizer (“zebra” → <unk>)") for note in drawn.notes)
    assert any(note.startswith("no panel for “a”, “,”, “and” (") for note in drawn.notes)  # punctuation reads as a word
    assert panel_titles(drawn) == ["zebra (unknown)", "dog", "cat"]


def test_a_truncated_caption_is_drawn_up_to_its_cut_and_the_rest_is_noted():
    tokens = ["<s>", "a", "red", "dog", "</s>"]
    view = planted_view(red_and_blue(), {"red": np.ones(GRID), "dog": -np.ones(GRID)}, tokens=tokens)
    read = view.tokens
    cut = replace(read, caption=read.caption + " runs past a blue cat")  # the context ended after "dog"
    drawn = draw(replace(view, tokens=cut, is_truncated=True))
    texts = texts_of(drawn)
    assert "“a red dog” | cut here: the model did not read the other 5 words" in texts
    assert not any("blue cat" in text and "“a red dog runs" in text for text in texts)  # the whole caption is not printed
    note = ("the model read the first 3 tokens of this caption (3 of its 8 words; its context ends there): "
            "the rest, “runs past a blue cat”, is not in this map")
    assert drawn.input_warnings == [note] and note in drawn.notes
    whole = draw(view)  # the same caption read whole: printed whole, no note
    assert "“a red dog”" in texts_of(whole) and not whole.input_warnings


def test_all_words_draws_punctuation_and_stop_words_too():
    tokens = ["<s>", "a", "dog", ",", "and", "cat", "</s>"]
    view = planted_view(red_and_blue(), {"dog": np.ones(GRID), ",": -np.ones(GRID)}, tokens=tokens)
    everything = draw(view, options=FigureOptions(skip_words=frozenset()))
    assert panel_titles(everything) == ["a", "dog", ",", "and", "cat"]
    assert not any("no panel" in note for note in everything.notes)


# --- layout: no text meets another or leaves the page --------------------------------------------------------
def recorded_text_boxes(monkeypatch) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Every text drawn from now on, with its box on the picture (as Pillow sets it)."""
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    draw_text = Canvas.text

    def text(self, xy, text, fill, font):
        boxes.append((text, ImageDraw.Draw(self.picture).textbbox(xy, text, font=font)))
        draw_text(self, xy, text, fill, font)

    monkeypatch.setattr(Canvas, "text", text)
    return boxes


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def assert_clean_layout(drawn, boxes) -> None:
    width, height = drawn.picture.size
    boxes = [(text, box) for text, box in boxes if text.strip()]
    for text, (x0, y0, x1, y1) in boxes:
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height, f"{text!r} leaves the {width} x {height} page"
    for n, (text, box) in enumerate(boxes):
        for other, other_box in boxes[n + 1 :]:
            assert not overlaps(box, other_box), f"{text!r} {box} meets {other!r} {other_box}"
    # nor does any text lie on a picture (the image, a map, a colour bar)
    pictures = [(x, y, x + p.size[0], y + p.size[1]) for (x, y), p in (item[1:3] for item in drawn.drawn if item[0] == "image")]
    for text, box in boxes:
        assert not any(overlaps(box, picture) for picture in pictures), f"{text!r} {box} lies on a picture"


ASPECTS = {"4:1": (256, 64), "1:4": (64, 256), "1:1": (64, 64)}


@pytest.mark.parametrize("layout", ["wide", "column"])
@pytest.mark.parametrize("aspect", list(ASPECTS))
@pytest.mark.parametrize("kind", ["words", "span", "box"])
@pytest.mark.parametrize("peak", [7.7e-5, 0.15, 2400.0])
def test_no_text_meets_another_or_leaves_the_page(monkeypatch, layout, aspect, kind, peak):
    size = ASPECTS[aspect]
    tokens = ["<s>", "a", "large", "red", "dog", ",", "and", "the", "small", "blue", "cat", "</s>"]
    rng = np.random.default_rng(0)
    values = {token: peak * rng.uniform(-1, 1, GRID) for token in ("large", "red", "dog", "small", "blue", "cat")}
    view = planted_view(Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)), values, tokens=tokens)
    boxes = recorded_text_boxes(monkeypatch)
    selection = {"words": {}, "span": {"span": "red dog"}, "box": {"box": (0.0, 0.0, size[0] / 2, size[1] / 2)}}[kind]
    drawn = draw(view, layout=layout, **selection)
    assert_clean_layout(drawn, boxes)
    labels = [text for text, _ in boxes]
    assert not any("-" in label for label in labels if re.fullmatch(r"[-+−]?[\d.]+", label))  # a true minus sign


def test_tick_labels_share_one_compact_format():
    from xclip.show.colour_bars import _tick_labels

    assert _tick_labels(0.15, 5)[1:] == (["−0.150", "−0.075", "0", "+0.075", "+0.150"], "")
    assert _tick_labels(7.7e-5, 5)[1:] == (["−7.7", "−3.8", "0", "+3.8", "+7.7"], "×10⁻⁵")
    assert _tick_labels(1.0, 5)[1:] == (["−1.0", "−0.5", "0", "+0.5", "+1.0"], "")
    assert _tick_labels(2.0, 3)[1:] == (["−2", "0", "+2"], "")
    assert _tick_labels(24000.0, 3)[1:] == (["−2.4", "0", "+2.4"], "×10⁴")


def test_tick_labels_keep_a_gap_from_their_tick_marks():
    view = planted_view(red_and_blue(), {"red</w>": np.full(GRID, -0.15)})
    drawn = draw(view, span="red")
    pen = ImageDraw.Draw(drawn.picture.copy())
    ticks = [points for kind, points, *_ in drawn.drawn if kind == "line" and points[1] == points[3]]  # the map bar's
    labels = [pen.textbbox(xy, text, font=dejavu_sans(size))
              for kind, xy, text, _, size in (item for item in drawn.drawn if item[0] == "text") if text[:1] in "−+0"]
    assert len(ticks) == 5
    for _, y, end, _ in ticks:
        label = min(labels, key=lambda box: abs((box[1] + box[3]) / 2 - y))  # the label beside the tick
        assert label[0] - end >= 3, (label, end)


@pytest.mark.slow  # figures at print sizes
@pytest.mark.parametrize("dpi", [100, 150])
def test_the_column_layout_fits_a_paper_column_and_the_wide_one_its_page(monkeypatch, tmp_path, dpi):
    tokens = ["<s>", "a", "red", "dog", "and", "a", "blue", "cat", "on", "green", "grass", "</s>"]
    values = {token: np.eye(4) for token in ("red", "dog", "blue", "cat", "green", "grass")}
    view = planted_view(red_and_blue(), values, tokens=tokens)
    boxes = recorded_text_boxes(monkeypatch)
    column = draw(view, options=FigureOptions(dpi=dpi), layout="column")
    assert_clean_layout(column, boxes)
    assert column.picture.size[0] <= 3.5 * dpi
    assert len(panel_titles(column)) == 6
    wide = draw(view, options=FigureOptions(dpi=dpi, layout="wide"))
    assert column.picture.size[0] < wide.picture.size[0] <= 7 * dpi
    for drawn, inches in ((column, 3.5), (wide, 7.0)):
        page = page_size(drawn.save(tmp_path / f"{drawn.name}-{drawn.picture.size[0]}.pdf"))
        assert page[0] <= inches * 72 + 0.01
    assert page_size(column.save(tmp_path / "column.pdf"))[0] == pytest.approx(3.5 * 72, abs=0.75)
    with pytest.raises(ConfigError, match="layout must be wide or column"):
        FigureOptions(layout="narrow")  # type: ignore[arg-type]


def page_size(pdf: Path) -> tuple[float, float]:
    x0, y0, x1, y1 = map(float, re.search(rb"/MediaBox\s*\[\s*([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", pdf.read_bytes()).groups())
    return x1 - x0, y1 - y0


# --- crops, zeros and outlines -----------------------------------------------------------------------------------
RED, GREEN, BLUE = (230, 20, 20), (20, 200, 20), (20, 20, 230)


def wide_view(crop_box: tuple[float, float, float, float]) -> PairView:
    """A 640 x 240 image, red, green and blue from left to right (green on x 200..440), seen through
    ``crop_box`` as a 64 x 64 input."""
    pixels = np.zeros((240, 640, 3), dtype=np.uint8)
    pixels[:, :200], pixels[:, 200:440], pixels[:, 440:] = RED, GREEN, BLUE
    image = Image.fromarray(pixels)
    geometry = Preprocessing((640, 240), crop_box, (64, 64), GRID)
    view = planted_view(image, {"dog": np.ones(GRID)})
    return replace(view, geometry=geometry, image=geometry.model_view(image), original=image)


def dimmed(colour: tuple[int, int, int]) -> np.ndarray:
    return np.round(0.35 * np.array(colour) + 0.65 * 255)


def test_a_crop_is_drawn_on_the_whole_image_and_noted():
    drawn = draw(wide_view((200.0, 0.0, 440.0, 240.0)))  # the centre crop of a CLIP processor
    _, (x, y), tile = next(item for item in drawn.drawn if item[0] == "image")
    pixels = np.asarray(tile)
    width = pixels.shape[1]
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(640 / 240, abs=0.02)  # the whole image, not the crop
    left, right = round(200 / 640 * width), round(440 / 640 * width)
    inside = pixels[4:-4, left + 4 : right - 4]
    assert (inside == GREEN).all()  # what the model saw, as it is
    assert (pixels[:, : left - 3] == dimmed(RED)).all(-1).mean() > 0.95  # what it did not see, dimmed
    assert (pixels[:, right + 3 :] == dimmed(BLUE)).all(-1).mean() > 0.95
    assert count(pixels, np.array(RED)) == count(pixels, np.array(BLUE)) == 0
    crop_outline = [item for item in drawn.drawn if item[0] == "rectangle" and item[3] == CROP]
    assert crop_outline and crop_outline[0][1][0] == pytest.approx(x + left, abs=1)
    note = "the model saw the centre 38% of this image (crop 240 x 240 of 640 x 240)"
    assert any(w.startswith(note) for w in drawn.warnings) and any(n.startswith(note) for n in drawn.notes)
    # the maps show the model's view: square, green
    map_tile = [item[2] for item in drawn.drawn if item[0] == "image"][1]
    assert map_tile.size[0] == map_tile.size[1]


def test_a_square_image_or_a_small_cut_gets_no_note():
    square = draw(planted_view(red_and_blue(), {"dog": np.ones(GRID)}))
    assert not any("the model saw" in note for note in square.notes)
    slight = draw(wide_view((8.0, 0.0, 632.0, 240.0)))  # 2.5% cut off: drawn, not noted
    assert not any("the model saw" in note for note in slight.notes)
    assert any(item[0] == "rectangle" and item[3] == CROP for item in slight.drawn)


def test_a_padded_image_is_drawn_inside_its_square():
    drawn = draw(wide_view((0.0, -200.0, 640.0, 440.0)))  # padded to a 640 x 640 square
    tile = np.asarray(next(item for item in drawn.drawn if item[0] == "image")[2])
    assert tile.shape[0] == tile.shape[1]
    side = tile.shape[0]
    assert (tile[: side // 4 - 2] == tile[0, 0]).all() and (tile[side * 3 // 4 + 2 :] == tile[0, 0]).all()  # the padding
    assert (tile[side // 2, side // 2] == GREEN).all() and (tile[side // 2, 2] == RED).all()  # the image, undimmed
    assert not any("the model saw" in note for note in drawn.notes)
    # outlines: the colour changes inside the image, but not the padding's edge, which outlines no object
    map_tile = np.asarray([item[2] for item in drawn.drawn if item[0] == "image"][1])
    outlined = (map_tile == CONTOUR).all(-1)
    assert outlined.any(axis=0).sum() >= 2  # the two vertical lines between red, green and blue
    assert outlined.mean(axis=1).max() < 0.2  # no horizontal line along the padding's edge


def test_a_caption_with_no_interaction_gets_a_note_not_a_made_up_scale(monkeypatch):
    tokens = ["<s>", "<unk>", "<unk>", "</s>"]
    view = planted_view(red_and_blue(), {}, tokens=tokens, words={"<unk>": "zebra"})
    boxes = recorded_text_boxes(monkeypatch)
    drawn = draw(view)
    assert "the model gives this caption no interaction with the image: all values are 0" in drawn.warnings
    labels = {text for text, _ in boxes}
    assert not labels & {"+1", "−1", "+1.0", "−1.0", "+0.5", "−0.5", "per patch"}  # no ±1 scale drawn
    assert drawn.map_halfrange == 0.0 and drawn.word_halfrange == 0.0
    assert_clean_layout(drawn, boxes)


def test_outlines_are_dropped_on_noise_and_kept_on_shapes():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    shape = np.full((64, 64, 3), 128, dtype=np.uint8)
    shape[16:48, 16:48] = RED
    for image, has_outlines in ((noise, False), (Image.fromarray(shape), True)):
        drawn = draw(planted_view(image, {"dog": np.ones(GRID)}), span="dog")
        map_tile = [item[2] for item in drawn.drawn if item[0] == "image"][1]
        share = count(map_tile, np.array(CONTOUR)) / (map_tile.size[0] * map_tile.size[1])
        assert (share > 0.01) == has_outlines, share
    assert outline_mask(noise.resize((400, 400))).sum() == 0


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


def test_a_run_scale_gives_equal_values_equal_colours(finished_run, tmp_path):
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


def test_a_span_over_many_pairs_skips_and_counts_the_pairs_without_it(finished_run, tmp_path):
    written, output = render(finished_run, "--span", "blue", "--out", tmp_path)
    assert [p.name for p in written] == ["pair000001_span-blue.png"]
    assert "skipped 2 pairs whose caption does not hold 'blue'" in output


def test_svg_and_pdf_keep_text_as_text_and_the_maps_pixels(finished_run, tmp_path):
    from xclip.show.pairs import load_pair_view
    from xclip.store.reader import RunReader

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


def test_render_run_takes_a_layout(finished_run, tmp_path):
    from xclip.show.render import render_run

    (pdf,) = render_run(finished_run, pairs=[0], out=tmp_path, file_format="pdf", layout="column").written
    assert page_size(pdf)[0] == pytest.approx(3.5 * 72, abs=0.75)


def test_the_api_draws_what_render_draws(finished_run, tmp_path, model_dirs):
    (rendered,) = render(finished_run, "--pair", "0", "--span", "red", "--out", tmp_path)[0]
    model = xclip.load_model(model_dirs["clip"], dtype="float32")
    attributor = xclip.InteractionAttribution(model, n_steps=2, tolerance=None)
    image = Image.open(finished_run.parent / "images" / "img0.png")
    (caption,) = attributor.text_contributions(["a red dog"])
    (picture,) = attributor.image_contributions([image])
    result = xclip.interaction_map(caption, picture)
    drawn = figure(result, image, span="red", title="pair 0")
    assert figure(result, image, span="red", title="pair 0", layout="column").picture.size[0] <= 350
    with Image.open(rendered) as from_run:
        same = (np.asarray(from_run.convert("RGB")) == np.asarray(drawn.picture)).all(-1)
    assert same.mean() > 0.999  # float32 storage may move a colour to its neighbouring level at a few pixels
    saved = drawn.save(tmp_path / "api.png")
    assert halfrange(saved) == pytest.approx(halfrange(rendered), rel=1e-5)
    with pytest.raises(ConfigError, match="not inside the image"):
        figure(result, image, box=(0, 0, 500, 500))
    with pytest.raises(ConfigError, match="does not occur in the caption"):
        figure(result, image, span="zebra")


def test_render_counts_the_pairs_left_beyond_its_limit_and_logs_progress(finished_run, tmp_path):
    written, output = render(finished_run, "--limit", "2", "--out", tmp_path / "two")
    flat = " ".join(output.split())
    assert [p.name for p in written] == ["pair000000.png", "pair000001.png"]
    assert "drew the first 2 finished pairs (--limit 2); 1 later finished pairs were not drawn" in flat
    assert "figures: 1/2" in flat and "figures: 2/2" in flat  # stderr is no terminal here: plain progress lines
    written, output = render(finished_run, "--span", "red", "--limit", "1", "--out", tmp_path / "span", "-q")
    flat = " ".join(output.split())
    assert [p.name for p in written] == ["pair000000_span-red.png"]
    assert "2 later finished pairs (not checked for the span) were not drawn" in flat and "figures:" not in flat
    written, output = render(finished_run, "--out", tmp_path / "all")
    assert len(written) == 3 and "not drawn" not in output


def test_a_panel_title_too_wide_for_its_panel_keeps_its_number_whole():
    # "background: +0.00249" in a 140-pixel panel was cut to "background: +0.00...", a number that reads as another:
    # a title is set smaller (down to four fifths) to fit whole, and only then is its label shortened
    font = dejavu_sans(12)
    for title in ("background: +0.00249", "zebra (unknown): +0.223", "a: -1.23e-05"):
        for width in (100.0, 130.0, 400.0):  # a map panel is at least 100 pixels wide
            shown, used = panel_title_fitting(title, font, width)
            value = title.rpartition(": ")[2]
            assert shown.endswith(": " + value) and used.getlength(shown) <= width, (title, width, shown)
            assert used.size >= 10  # never below four fifths of the panel titles' size
            if shown != title:  # shortened only where even the smallest size cannot hold it whole
                assert shown.endswith("…: " + value) and dejavu_sans(10).getlength(title) > width
            elif font.getlength(title) <= width:
                assert used.size == 12  # a title that fits keeps its size
