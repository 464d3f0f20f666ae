"""What the model read, said by every reader alike: a caption cut at the demo model's 32-token context, a word its
tokenizer does not know, and a wide image the centre crop cut to a third, shown by the figures, ``inspect``,
``explain`` and the viewer's pair answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import attribute, browser, invoke, page_url, serving, wait_settled

from xclip.run.explain import explain
from xclip.attribution.inputs_read import caption_read, image_read
from xclip.store.describe import describe_inputs_read, inputs_read_report
from xclip.show.figures import draw
from xclip.show.pairs import load_pair_view
from xclip.store.reader import RunReader
from xclip.core.tokens import CaptionTokens
from xclip.show.viewer import RunData

SCENE = Path(__file__).resolve().parents[1] / "configs" / "demo" / "scenes" / "scene00001.png"
# 38 words; the demo model's context holds 32 tokens: BOS, 30 words (one token each), EOS
LONG = "a red circle " * 10 + "and a green cross beside a yellow star"
UNKNOWN = "a red zebra circle"  # "zebra" is not in the demo model's vocabulary
ALL_UNKNOWN = "zebra giraffe"
CAPTIONS = [UNKNOWN, LONG, "a blue square", ALL_UNKNOWN]
CUT_AT = len("a red circle " * 10)  # the 30th word, "circle", ends one character before
TRUNCATION_NOTE = ("the model read the first 30 tokens of this caption (30 of its 38 words; its context ends there): the "
                   "rest, “and a green cross beside a yellow star”, is not in this map")
UNKNOWN_NOTE = "zebra: unknown to the tokenizer (“zebra” → <unk>); its panel shows the unknown token, not the word"
CROP_NOTE = ("the model saw the centre 33% of this image (crop 64 x 64 of 192 x 64): the maps cover only the crop, "
             "the rest of the image is in no map")


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory) -> tuple[Path, object]:
    """The demo model on one wide image (a scene in the middle of a grey canvas three times its width) with a
    caption holding an unknown word, one longer than the context, a plain one and one of unknown words only."""
    root = tmp_path_factory.mktemp("inputs-read")
    wide = Image.new("RGB", (192, 64), (128, 128, 128))
    wide.paste(Image.open(SCENE).convert("RGB"), (64, 0))
    wide.save(root / "wide.png")
    explanation = explain(root / "wide.png", CAPTIONS, output=root / "run", device="cpu", dtype="float64")
    return root / "run", explanation


def test_a_caption_read_is_cut_where_its_last_read_token_ends():
    assert len(LONG.split()) == 38
    words = LONG.split()[:3]
    offsets, start = [(0, 0)], 0
    for word in words:
        offsets.append((start, start + len(word)))
        start += len(word) + 1
    tokens = CaptionTokens(LONG, ["<s>", *words, "</s>"], [*offsets, (0, 0)], [True, False, False, False, True], [False] * 5)
    read = caption_read(tokens, is_truncated=True)
    assert (read.read_text, read.n_tokens_read, read.n_words_read, read.n_words) == ("a red circle", 3, 3, 38)
    assert read.unread_text == LONG[len("a red circle") :].strip()
    whole = caption_read(tokens, is_truncated=False)  # the flag decides: a caption read whole has no rest
    assert whole.unread_text == "" and whole.truncation_note() is None and whole.read_text == LONG


def test_every_reader_says_what_the_model_read(wide_run, tmp_path):
    run_dir, explanation = wide_run
    with RunReader(run_dir) as run:
        described = describe_inputs_read(run)
        assert run.captions() == CAPTIONS
        read = caption_read(run.caption_tokens(1), is_truncated=True)
        seen = image_read(run.preprocessing(0), resize="native")
    assert read.read_end == CUT_AT - 1 and read.truncation_note() == TRUNCATION_NOTE
    assert seen.crop_note() == CROP_NOTE and seen.crop_box == (64.0, 0.0, 128.0, 64.0)
    # inspect's summary (what evaluate's report takes too): the truncated caption with its rest
    assert described["truncated_captions"] == [{"index": 1, "caption": LONG, "n_tokens_read": 30, "n_words_read": 30,
                                                "n_words": 38, "unread": LONG[CUT_AT:]}]
    assert described["unknown_words"]["words"] == {"zebra": 2, "giraffe": 1}
    assert [item["image"] for item in described["cropped_images"]["images"]] == ["wide.png"]
    assert inputs_read_report(run_dir) == inputs_read_report(run_dir / "run.h5") == described
    # explain: each pair's notes, in order truncation, unknown words, crop
    all_unknown_note = ("zebra, giraffe: unknown to the tokenizer (“zebra” → <unk>, “giraffe” → <unk>); their panels show "
                        "the unknown token, not the words")
    assert [pair.input_notes for pair in explanation.pairs] == [
        [UNKNOWN_NOTE, CROP_NOTE], [TRUNCATION_NOTE, CROP_NOTE], [CROP_NOTE], [all_unknown_note, CROP_NOTE]]
    # the figures: the same notes, the cut marked in the header, the unknown word's panel titled as such
    figures = sorted(explanation.pairs[1].figure.parent.glob("*.png"))
    assert len(figures) == 4
    # inspect, text and JSON
    code, output = invoke("inspect", run_dir, "--json")
    assert code == 0 and json.loads(output)["truncated_captions"] == described["truncated_captions"]
    code, output = invoke("inspect", run_dir)
    flat = " ".join(output.split())
    assert code == 0 and ("caption 1 is longer than the model's context: it read the first 30 tokens (30 of 38 words); "
                          f"the rest, '{LONG[CUT_AT:]}', is in no map") in flat
    # the viewer's pair answer: the same notes, the cut, unknown chips
    answer = RunData(run_dir).pair(1)
    assert answer["input_notes"] == [TRUNCATION_NOTE, CROP_NOTE]
    assert answer["caption"][: answer["read_end"]] == LONG[: CUT_AT - 1] and answer["unread"] == LONG[CUT_AT:]
    chips = RunData(run_dir).pair(0)["chips"]
    assert [chip["text"] for chip in chips if chip["unknown"]] == ["zebra"]


def test_a_figure_draws_a_truncated_caption_to_its_cut_and_titles_unknown_words(wide_run):
    run_dir, _ = wide_run
    with RunReader(run_dir) as run:
        long_view, unknown_view = load_pair_view(run, 1, run_dir / "inputs"), load_pair_view(run, 0, run_dir / "inputs")
    drawn = draw(long_view)
    texts = [item[2] for item in drawn.drawn if item[0] == "text"]
    assert drawn.input_warnings == [TRUNCATION_NOTE, CROP_NOTE]
    header = " ".join(text for text in texts if text.startswith("“") or "cut here" in text)
    assert "cut here: the model did not read the other 8 words" in header and "yellow" not in header
    titles = [item[2] for item in draw(unknown_view).drawn if item[0] == "text"]
    assert any(title.startswith("zebra (unknown): ") for title in titles)


@browser
def test_the_pair_page_shows_what_the_model_read(wide_run, driver):
    from selenium.webdriver.common.by import By

    run_dir, _ = wide_run
    with serving(run_dir) as server:
        url = page_url(server)
        driver.get(url + "#pair=1")
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "1")
        notes = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#input-notes li")]
        assert notes == [TRUNCATION_NOTE, CROP_NOTE]  # the figures' wording
        unread = driver.find_element(By.ID, "unread-text")
        assert unread.is_displayed() and unread.text == LONG[CUT_AT:]
        assert driver.execute_script("return getComputedStyle(arguments[0]).textDecorationLine", unread) == "line-through"
        title = driver.find_element(By.ID, "pair-title").text
        assert title == f"pair 1: “{LONG[: CUT_AT - 1]}” ✂ cut at the model's context · wide.png"
        words = [chip.text for chip in driver.find_elements(By.CSS_SELECTOR, ".chip:not(.special)")]
        assert words == LONG[:CUT_AT].split()  # the chips are the 30 words read, the rest only struck through

        driver.get(url + "#pair=0")
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0")
        unknown = driver.find_elements(By.CSS_SELECTOR, ".chip.unknown")
        assert [chip.text for chip in unknown] == ["zebra"]
        assert "the tokenizer did not know “zebra”" in unknown[0].get_attribute("title")
        assert not driver.find_element(By.ID, "unread").is_displayed()
        assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#input-notes li")] == [UNKNOWN_NOTE, CROP_NOTE]
        assert not driver.find_element(By.ID, "scale-note").is_displayed()  # a map of real words: its own scale
        peak = RunData(run_dir).pair(0)["map_peak"]
        rows = [int(r) for r in attribute(driver, "map", "data-rows").split(",")]
        own = np.abs(np.asarray(RunData(run_dir).pair(0)["interactions"])[rows, 1:].sum(0)).max()
        assert float(attribute(driver, "map", "data-halfrange")) == pytest.approx(own, rel=1e-9) and own <= peak * len(rows)

        driver.get(url + "#pair=3")  # every word unknown: the run's scale, said, instead of stretching the map
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "3")
        run_scale = RunData(run_dir).run_scale()["value"]
        note = driver.find_element(By.ID, "scale-note")
        assert note.is_displayed() and note.text.startswith("every word of this caption is unknown to the tokenizer: its map")
        assert float(attribute(driver, "map", "data-halfrange")) == pytest.approx(run_scale, rel=1e-9)
        assert [chip.text for chip in driver.find_elements(By.CSS_SELECTOR, ".chip.unknown")] == ["zebra", "giraffe"]


def test_api_maps_name_the_caption_and_image_they_pair_and_draw_a_cut_caption_so(wide_run):
    import xclip
    from xclip.show.figures import figure

    run_dir, _ = wide_run
    wide = run_dir / "inputs" / "wide.png"
    attributor = xclip.InteractionAttribution(xclip.load_model("xclip:demo", device="cpu", dtype="float64"))
    picture = Image.open(SCENE).convert("RGB")
    maps = attributor.attribute(["a blue square", LONG], [wide, picture], pairs=[(1, 0), (0, 1)])
    assert [(m.caption_index, m.image_index, m.image, m.caption, m.is_caption_truncated) for m in maps] == [
        (1, 0, str(wide), LONG, True), (0, 1, None, "a blue square", False)]
    crossed = attributor.attribute(["a blue square", LONG], [picture])  # the default: every caption with every image
    assert [(m.caption_index, m.image_index) for m in crossed] == [(0, 0), (1, 0)]
    assert figure(maps[0], wide).input_warnings == [TRUNCATION_NOTE, CROP_NOTE]


def test_evaluate_reports_what_the_model_read(wide_run, tmp_path):
    run_dir, _ = wide_run
    line = {"image": "wide.png", "caption": "a blue square",  # the scene's square, moved with it to the canvas' middle
            "phrases": [{"text": "blue square", "start": 2, "end": 13, "boxes": [[65, 22, 85, 42]], "class": "square"}]}
    (tmp_path / "annotations.jsonl").write_text(json.dumps(line) + "\n")
    code, _ = invoke("evaluate", run_dir, "-a", tmp_path / "annotations.jsonl", "--out", tmp_path / "evaluation")
    report = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    assert code == 0 and report["inputs_read"] == inputs_read_report(run_dir)
    assert [item["index"] for item in report["inputs_read"]["truncated_captions"]] == [1]
    assert report["inputs_read"]["cropped_images"]["images"] == [{"image": "wide.png", "seen_share": pytest.approx(1 / 3)}]


@pytest.mark.slow  # the API on the demo model in a fresh process
def test_the_api_prints_no_warning_that_contradicts_what_the_model_read(tmp_path: Path) -> None:
    # a fresh process (torch warns once per process, transformers once per tokenizer), every warning shown:
    # transformers' "will result in indexing errors" for the untruncated length xclip measures the cut with, and
    # torch's deprecation of its own jit.script on the first forward-mode derivative, are neither true nor actionable
    import subprocess
    import sys

    script = (
        "import warnings; warnings.simplefilter('always')\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "import xclip\n"
        "model = xclip.load_model(Path(xclip.__file__).parent / 'models' / 'shapes-clip', device='cpu')\n"
        f"(pair,) = xclip.InteractionAttribution(model, n_steps=2).attribute([{LONG!r}], [Image.open({str(SCENE)!r})])\n"
        "print(pair.is_caption_truncated)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.strip() == "True"  # the caption was cut: the case the tokenizer warns about
    assert "indexing errors" not in done.stderr and "jit.script" not in done.stderr, done.stderr
