"""``xclip words``: the audit of every word of a run, on planted maps whose answer is known (a word on one patch,
a word spread evenly, a word whose sign flips between images), against a plainly written reference; the same
audit from a run with contributions and from a summary run; streamed in blocks as in one; and, on the demo world,
content words apart from filler words."""

from __future__ import annotations

import json
import math
import statistics

import h5py
import numpy as np
import pytest
import yaml
from helpers import code_blocks, expect, invoke, make_images, plant_map, section

from xclip.analysis import words as words_module
from xclip.analysis.synthetic import COLOURS, SHAPES, VOCABULARY, generate, write_scenes
from xclip.analysis.words import WordTally, audit_words, word_occurrences
from xclip.attribution.summary import summarise_map
from xclip.core.tokens import CaptionTokens
from xclip.errors import ConfigError, StoreError
from xclip.store.reader import RunReader

N_PAIRS = 6
CAPTION = "a red dog"
GRID = (4, 4)  # the tiny random CLIP's patches
N_PATCHES = GRID[0] * GRID[1]
RED_PATCH = 6  # row 1, column 2


def write_run(root, model_dir: str, **output: str) -> None:
    """The tiny random CLIP on N_PAIRS images, each with CAPTION, into ``root / "run"``."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for k, image in enumerate(make_images(N_PAIRS)):
        image.save(images / f"img{k}.png")
        lines.append(json.dumps({"file_name": f"img{k}.png", "text": CAPTION}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "model": {"name": model_dir, "device": "cpu"},
        "attribution": {"n_steps": 2, "tolerance": None},
        "data": {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
        "pairing": {"mode": "given"},
        "output": {"directory": "run", **output},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    code, output_text = invoke("attribute", root / "run.yaml", "-q")
    assert code == 0, output_text


def planted_map(tokens: CaptionTokens, pair: int) -> np.ndarray:
    """The map of pair ``pair`` (column 0 is the CLS position, column 1 + p patch p): 'red' all on one patch, 'dog'
    spread evenly over every patch, and 'a' raising the score in even pairs (3 on patch 0) and lowering it in odd
    ones (-4 on patch 0, 1 on patch 1); special tokens 0."""
    rows = {word.text: word.rows[0] for word in tokens.words()}
    interactions = np.zeros((len(tokens), 1 + N_PATCHES), dtype=np.float32)
    interactions[rows["red"], 1 + RED_PATCH] = 2.0
    interactions[rows["dog"], 1:] = 0.25
    if pair % 2 == 0:
        interactions[rows["a"], 1] = 3.0
    else:
        interactions[rows["a"], 1:3] = (-4.0, 1.0)
    return interactions


@pytest.fixture()
def planted_run(tmp_path, model_dirs):
    write_run(tmp_path, model_dirs["clip"], pair_maps="store")
    maps = []
    with RunReader(tmp_path / "run") as reader:
        assert reader.grid == GRID and reader.n_prefix == 1
        tokens = reader.caption_tokens(0)
    with h5py.File(tmp_path / "run" / "run.h5", "r+") as f:
        for pair in range(N_PAIRS):
            maps.append(planted_map(tokens, pair))
            plant_map(f, pair, np.pad(maps[-1], ((0, f["pairs"]["interactions"].shape[1] - len(tokens)), (0, 0))))
    return tmp_path / "run", tokens, maps


def reference(tokens: CaptionTokens, maps: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per word, plainly: occurrences, and the mean, mean size and positive fraction of row sum / sum of |row sums|."""
    shares: dict[str, list[float]] = {}
    for interactions in maps:
        sums = interactions.astype(np.float64).sum(axis=1)
        for word in tokens.words():
            shares.setdefault(word.text, []).append(sums[word.rows].sum() / np.abs(sums).sum())
    return {word: {"count": len(s), "signed_share": float(np.mean(s)), "share": float(np.mean(np.abs(s))),
                   "raises_score": float(np.mean(np.array(s) > 0))} for word, s in shares.items()}


def test_planted_words_get_their_known_concentration_consistency_and_shares(planted_run):
    run, tokens, maps = planted_run
    audit = audit_words(run, min_count=1, flagged=3)
    assert audit.n_pairs == N_PAIRS and (audit.n_patches, audit.top_patches) == (N_PATCHES, 5)
    assert [w.word for w in audit.words] == ["a", "dog", "red"]  # by count (all 6), then alphabetically
    expected = reference(tokens, maps)
    for stats in audit.words:
        assert stats.count == stats.pairs == expected[stats.word]["count"] == N_PAIRS
        for name in ("signed_share", "share", "raises_score"):
            assert getattr(stats, name) == pytest.approx(expected[stats.word][name], abs=1e-7), (stats.word, name)
    red, dog, a = audit.word("red"), audit.word("dog"), audit.word("a")
    # all its mass on one patch, in every image: as concentrated as a map can be, and as consistent
    assert (red.top_share, red.entropy, red.top_share_std, red.spread, red.centroid_dispersion) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert red.centroid == pytest.approx(((1 + 0.5) / 4, (2 + 0.5) / 4))
    assert red.raises_score == 1.0 and red.cancelled_share == pytest.approx(0.0, abs=1e-9)
    # spread evenly: entropy 1, and the top 5 patches hold 5/16 of it; the most diffuse word
    assert dog.entropy == pytest.approx(1.0) and dog.top_share == pytest.approx(5 / N_PATCHES)
    # (a summary stores spreads in float16, and a run with maps rounds them as a summary run would)
    assert dog.centroid == pytest.approx((0.5, 0.5)) and dog.spread == pytest.approx(math.sqrt(10 / 64), rel=1e-3)
    assert audit.most_diffuse[0] == "dog" and audit.most_diffuse[-1] == "red"
    # raises the score in half the images and lowers it in the others: the least consistent word
    # (its row sums to 3 or to -3: its signed shares cancel, all of its share)
    assert a.raises_score == 0.5 and a.signed_share == pytest.approx(0.0, abs=1e-9)
    assert a.cancelled_share == pytest.approx(a.share) and a.share == pytest.approx(3 / 9)
    assert audit.least_consistent[0] == "a" and a.cancelled_share > max(red.cancelled_share, dog.cancelled_share) + 0.3
    # its positive mass sits on patch 0 in even pairs and on patch 1 in odd ones: centroids a quarter of the grid
    # apart, each an eighth from their mean
    assert a.top_share == 1.0 and a.centroid == pytest.approx((0.125, 0.25)) and a.centroid_dispersion == pytest.approx(0.125)
    # its best pair raises the score most (the first even pair of equal ones), its worst lowers it most
    assert (a.best.pair, a.worst.pair) == (0, 1)
    assert a.best.share == pytest.approx(3 / (3 + 2 + 4), abs=1e-7) and a.worst.share == pytest.approx(-3 / (3 + 2 + 4), abs=1e-7)
    assert (a.best.link, a.worst.link) == ("#pair=0&span=a", "#pair=1&span=a")
    assert (a.best.caption, a.best.image, a.best.start, a.best.end) == (CAPTION, "img0.png", 0, 1)


def test_the_tally_holds_a_row_per_word_and_equals_a_plain_reference_over_many_blocks():
    """Occurrences folded in over blocks: the running sums give the mean, the standard deviation and the centroid
    dispersion numpy gives over every occurrence at once, and hold one entry per word however many pairs pass."""
    rng = np.random.default_rng(0)
    tokens = CaptionTokens("red red dog", ["<s>", "red", "red", "dog", "</s>"], [(0, 0), (0, 3), (4, 7), (8, 11), (0, 0)],
                           [True, False, False, False, True], [False] * 5)
    tally, seen = WordTally(), []
    for block in range(40):
        found = []
        for _ in range(5):
            interactions = rng.normal(size=(len(tokens), 1 + N_PATCHES))
            found.append(word_occurrences(tokens, summarise_map(interactions, len(tokens), GRID, 1, top_cells=4, top_patches=3).token))
        tally.add(range(block * 5, block * 5 + 5), [0] * 5, found)
        seen += [o for pair in found for o in pair]
        assert len(tally.sums["count"]) == 64  # its first size: two words never grow it
    stats = tally.stats()
    for word in ("red", "dog"):
        mine = [o for o in seen if o.word == word]
        top = np.array([o.top_share for o in mine if not math.isnan(o.top_share)])
        centroids = np.array([(o.centroid_row, o.centroid_column) for o in mine if not math.isnan(o.top_share)])
        assert stats[word]["count"] == len(mine) == {"red": 400, "dog": 200}[word]
        assert stats[word]["pairs"] == 200  # 'red' twice in each caption is one pair
        assert stats[word]["top_share"] == pytest.approx(top.mean()) and stats[word]["top_share_std"] == pytest.approx(top.std())
        assert stats[word]["centroid_dispersion"] == pytest.approx(np.sqrt(((centroids - centroids.mean(0)) ** 2).sum(1).mean()))
        assert stats[word]["share"] == pytest.approx(np.mean([abs(o.share) for o in mine]))
        best, worst = stats[word]["best"], stats[word]["worst"]
        assert best[0] == max(o.share for o in mine) and worst[0] == min(o.share for o in mine)


def assert_same_audit(first: dict, second: dict) -> None:
    """Two records of words.json agree: the same words, counts, flags and best and worst pairs, and their numbers
    to float32's precision (sums taken in another order, maps rounded as a summary stores them)."""
    assert [w["word"] for w in first["words"]] == [w["word"] for w in second["words"]]
    assert (first["most_diffuse"], first["least_consistent"]) == (second["most_diffuse"], second["least_consistent"])
    for a, b in zip(first["words"], second["words"]):
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["word"], key)
            elif key in ("best", "worst"):
                assert (value["pair"], value["link"]) == (b[key]["pair"], b[key]["link"]), (a["word"], key)
                assert value["share"] == pytest.approx(b[key]["share"], rel=1e-5, abs=1e-7)
            elif key == "centroid":
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["word"], key)
            else:
                assert value == b[key], (a["word"], key)


def test_streaming_in_small_blocks_gives_the_audit_of_one_block(demo_run, monkeypatch):
    """The demo's first 40 pairs (3 captions with their 12 images each, then 4 pairs of a fourth) in one block, and
    in blocks of 7 rows with one caption kept between blocks: captions that straddle blocks, read again once
    dropped."""
    with h5py.File(demo_run / "run.h5", "r+") as f:
        f["pairs"]["status"][[5, 6, 20]] = 0  # pending: blocks with gaps
    whole = audit_words(demo_run, min_count=1).record()
    assert whole["n_pairs"] == 37
    monkeypatch.setattr(words_module, "BLOCK_PAIRS", 7)
    monkeypatch.setattr(words_module, "CAPTION_CACHE", 1)
    assert_same_audit(audit_words(demo_run, min_count=1).record(), whole)


def test_a_run_with_contributions_and_a_summary_run_give_the_same_audit(tmp_path, model_dirs):
    write_run(tmp_path / "full", model_dirs["clip"])
    write_run(tmp_path / "summary", model_dirs["clip"], contributions="none")
    full = audit_words(tmp_path / "full" / "run", min_count=1).record()
    summary = audit_words(tmp_path / "summary" / "run", min_count=1).record()
    assert full.pop("run") != summary.pop("run")
    with RunReader(tmp_path / "summary" / "run") as reader:
        assert not reader.stores_contributions
        one_by_one = [reader.pair_summary(pair) for pair in range(N_PAIRS)]
        assert [s.token.values.tolist() for s in reader.pair_summaries(np.arange(N_PAIRS))] == [s.token.values.tolist() for s in one_by_one]
        with pytest.raises(ConfigError, match=f"pair {N_PAIRS} of .* is not one of its pairs"):
            reader.pair_summaries([0, N_PAIRS])
    assert [w["word"] for w in full["words"]] == ["a", "dog", "red"]
    assert_same_audit(full, summary)


def test_a_damaged_summary_is_refused_by_the_block_reader(tmp_path, model_dirs):
    write_run(tmp_path, model_dirs["clip"], contributions="none")
    with h5py.File(tmp_path / "run" / "run.h5", "r+") as f:
        f["pairs"]["token_values"][3] = 0.0  # the checksum no longer matches
    with pytest.raises(StoreError, match=r"pairs 3 is damaged"):
        audit_words(tmp_path / "run")


def test_the_command_prints_the_tables_and_writes_words_json_and_the_chart(planted_run, tmp_path):
    run, _, _ = planted_run
    code, output = invoke("words", run, "--min-count", "2", "--top", "2", "--flagged", "3", "-q")
    assert code == 0, output
    assert (run / "words.json").is_file() and (run / "words.png").read_bytes().startswith(b"\x89PNG")
    assert "2 most frequent of 3 words" in " ".join(output.split()) and "most diffuse" in output and "least consistent" in output
    # the links as whole lines, which a table's border would cut
    assert "  'a' best 0: http://127.0.0.1:8765/#pair=0&span=a   worst 1: http://127.0.0.1:8765/#pair=1&span=a\n" in output
    written = json.loads((run / "words.json").read_text())
    code, output = invoke("words", run, "--min-count", "2", "--json", "--output", tmp_path / "elsewhere", "-q")
    assert code == 0 and json.loads(output) == written == json.loads((tmp_path / "elsewhere" / "words.json").read_text())
    assert written["words"][0]["best"]["link"] == "#pair=0&span=a" and written["words"][0]["top_share"] is not None


def test_the_command_says_when_there_is_nothing_to_audit(planted_run):
    run, _, _ = planted_run
    expect(["words", run, "--min-count", "7"], 2, r"no word of .* occurs 7 times or more in its 6 finished pairs \(the most "
           r"frequent 6 times\): lower it")
    with h5py.File(run / "run.h5", "r+") as f:
        f["pairs"]["status"][:] = 0  # pending: a run that has finished nothing yet
    expect(["words", run], 2, r"has no finished pairs, so there are no maps to audit yet")
    with pytest.raises(ConfigError):
        audit_words(run)


@pytest.mark.slow  # 40 fresh scenes attributed by the demo model
def test_content_words_carry_the_demo_worlds_maps_and_filler_words_do_not(tmp_path):
    """Measured on these 40 scenes: the median share of the 13 colour and shape words is 0.186, of the 15 filler
    words 0.004; the least of the content words ('star', 0.047) carries more than the most of the filler words
    ('on', 0.017). On the 200 scenes of docs/words.md: 0.055 ('star') against 0.015 ('on')."""
    folder = write_scenes(generate(40, seed=50000), tmp_path / "scenes")
    config = {"model": {"name": "xclip:demo", "device": "cpu"},
              "data": {"format": "imagefolder", "root": str(folder), "metadata": str(folder / "metadata.jsonl")},
              "pairing": {"mode": "given"}, "output": {"directory": str(tmp_path / "run")}, "runtime": {"batch_size": 64}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert invoke("attribute", tmp_path / "run.yaml", "-q")[0] == 0
    audit = audit_words(tmp_path / "run", min_count=3)
    content = [w.share for w in audit.words if w.word in set(COLOURS) | set(SHAPES)]
    filler = [w.share for w in audit.words if w.word in set(VOCABULARY) - set(COLOURS) - set(SHAPES)]
    assert len(content) >= 10 and len(filler) >= 8
    assert statistics.median(content) > 10 * statistics.median(filler)
    assert min(content) > max(filler)


@pytest.mark.slow  # the demo run of 40 pairs
def test_the_documented_commands_run(tmp_path, demo_run, monkeypatch):
    (block,) = code_blocks(section("docs/words.md", "Running it"), "bash")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_run)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in block.splitlines():
        arguments = line.split("#")[0].split()
        assert arguments[0] == "xclip", line
        code, output = invoke(*arguments[1:])
        assert code == 0, f"{line}\n{output}"
        outputs.append(output)
    for folder in ("runs/demo", "runs/demo-words"):
        assert json.loads((tmp_path / folder / "words.json").read_text())["n_pairs"] == 40
        assert (tmp_path / folder / "words.png").is_file()
    assert json.loads(outputs[2][outputs[2].index("{"):])["min_count"] == 5  # after the progress lines (stderr)
    assert json.loads((tmp_path / "runs/demo-words/words.json").read_text())["min_count"] == 10
