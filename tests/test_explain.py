"""`xclip explain`: one image and its captions, no config file, the numbers of an equivalent `attribute` run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import expect, invoke, json_line

from xclip.store.reader import RunReader

SCENES = Path(__file__).resolve().parents[1] / "configs" / "demo" / "scenes"
CAPTIONS = ["a blue star", "two objects: a purple cross and a blue star"]


def test_explain_prints_the_numbers_of_an_equivalent_attribute_run(tmp_path):
    image = tmp_path / "scene.png"
    shutil.copyfile(SCENES / "scene00000.png", image)
    code, output = invoke("explain", image, *CAPTIONS, "--output", tmp_path / "explained", "--json")
    assert code == 0, output
    printed = json.loads(output)["pairs"]
    # the same image and captions through a config of our own
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copyfile(image, folder / "scene.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "scene.png", "text": CAPTIONS}) + "\n")
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"name": "xclip:demo", "device": "cpu"},  # what explain loads by default
        "data": {"format": "imagefolder", "root": "data", "metadata": "data/metadata.jsonl"},
        "output": {"directory": "attributed"},
    }))
    assert invoke("attribute", tmp_path / "run.yaml", "-q")[0] == 0
    with RunReader(tmp_path / "attributed") as reference:
        assert [reference.captions()[c] for c in reference.column("pairs", "caption_index")] == [p["caption"] for p in printed]
        for name in ("score", "four_term_value", "completeness_error"):
            assert [float(v) for v in reference.column("pairs", name)] == [p[name] for p in printed], name
    # one figure per caption, on one shared scale (the default), and a run directory other commands read
    figures = [Path(p["figure"]) for p in printed]
    assert [f.name for f in figures] == ["pair000000.png", "pair000001.png"]
    scales = {Image.open(f).text["xclip:halfrange"] for f in figures}
    assert len(scales) == 1
    assert invoke("inspect", tmp_path / "explained")[0] == 0
    shutil.move(tmp_path / "explained", tmp_path / "moved")  # the run keeps a copy of its image
    image.unlink()
    code, output = invoke("render", tmp_path / "moved", "--pair", "1", "--span", "purple cross")
    assert code == 0, output


@pytest.mark.slow  # explain on the demo model
def test_explain_without_output_writes_figures_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = Image.open(SCENES / "scene00001.png")
    image.save(tmp_path / "photo.jpg")
    code, output = invoke("explain", "photo.jpg", "a red circle", "--format", "svg", "--json")
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "xclip-explain-photo").iterdir()) == ["pair000000.svg"]
    assert not (tmp_path / "inputs").exists()  # the run directory was temporary
    (pair,) = json.loads(output)["pairs"]
    assert pair["caption"] == "a red circle" and np.isfinite(pair["score"]) and pair["figure"] == "xclip-explain-photo/pair000000.svg"
    assert json.loads(output)["run_directory"] is None
    code, table = invoke("explain", "photo.jpg", "a red circle")  # a table on stdout without --json
    assert code == 0 and f"{pair['score']:.4f}" in table
    # at 80 columns: the figure by its file name in the table, the folder once below, no line past the width
    assert "pair000000.png" in table and "figures in xclip-explain-photo" in table
    assert max(len(line) for line in table.splitlines()) <= 80, table


def test_explain_errors_are_clear(tmp_path):
    expect(["explain", tmp_path / "missing.png", "a cat"], 2, r"image .*missing.png is not there")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    expect(["explain", tmp_path / "x.png", "a cat", "--scale", "-1"], 2, r"--scale must be figure, run or a positive number")
    expect(["explain", tmp_path / "x.png", ""], 2, r"caption")


def test_words_the_tokenizer_does_not_know_are_noted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = invoke("explain", SCENES / "scene00000.png", "a zebra star", "two zebra", "--output", "run")  # the demo's vocabulary has no zebra
    flat = " ".join(output.split())
    # named by the caption's own word, not the unknown token's string, once for both captions
    assert code == 0 and flat.count("'zebra' is unknown to the tokenizer (2 captions)") == 1
    assert flat.count("zebra") == 3  # the warning and the two captions in the table, no other note about it
    # render (which has no run summary) passes on each figure's note, with the token the model read instead
    code, output = invoke("render", "run", "--pair", "1")
    assert code == 0 and "pair 1: zebra: unknown to the tokenizer (“zebra” → <unk>)" in " ".join(output.split())


def test_the_shipped_model_is_named_xclip_demo_everywhere(tmp_path):
    import torch

    import xclip
    from xclip.models.loading import SHIPPED_MODELS

    by_name, by_path = xclip.load_model("xclip:demo", device="cpu"), xclip.load_model(SHIPPED_MODELS["demo"], device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(by_name.model.state_dict().values(), by_path.model.state_dict().values()))
    with pytest.raises(xclip.ConfigError, match=r"no shipped model is called 'xclip:demo2'; xclip ships xclip:demo"):
        xclip.load_model("xclip:demo2")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    expect(["explain", tmp_path / "x.png", "a star", "--model", "xclip:nope"], 2, r"--model: no shipped model is called 'xclip:nope'")
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"name": "xclip:nope"}, "data": {"format": "queries", "root": ".", "queries": ["a"]}, "output": {"directory": "r"}}))
    expect(["attribute", tmp_path / "run.yaml"], 2, r"model.name: no shipped model is called 'xclip:nope'")
    (tmp_path / "run.yaml").write_text(json.dumps({  # "demo" is a hub id, but the error says what was meant
        "model": {"name": "demo", "local_files_only": True}, "data": {"format": "queries", "root": ".", "queries": ["a"]},
        "output": {"directory": "r"}}))
    expect(["attribute", tmp_path / "run.yaml"], 1, r"cannot load model 'demo': .* \(the shipped model is called xclip:demo\)")


def test_explain_lists_failures_readably_naming_the_users_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.png").write_text("not an image")
    code, output = invoke("explain", "notes.png", "a red star", "a blue star")
    assert code == 3
    # one line for the one problem, with both captions, about the file the user gave (not the run's copy)
    assert output.splitlines() == [
        "failed (2 captions: “a red star”, “a blue star”): cannot read image notes.png: not an image format Pillow "
        "recognises, or the file is damaged"
    ]


def wide_scene(path: Path) -> Path:
    """Two demo scenes with white between them: 192 x 64, a centre crop keeps the white third only."""
    wide = Image.new("RGB", (192, 64), "white")
    wide.paste(Image.open(SCENES / "scene00000.png"), (0, 0))
    wide.paste(Image.open(SCENES / "scene00001.png"), (128, 0))
    wide.save(path)
    return path


def test_unknown_words_and_cropped_images_are_warned_once_and_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    wide_scene(folder / "wide.png")
    shutil.copyfile(SCENES / "scene00000.png", folder / "square.png")
    records = [{"file_name": "wide.png", "text": ["a zebra star", "a dog and a zebra"]},
               {"file_name": "square.png", "text": ["a blue star"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"name": "xclip:demo", "device": "cpu"}, "attribution": {"n_steps": 2, "tolerance": None},
        "data": {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
        "output": {"directory": "run"}}))
    code, output = invoke("attribute", tmp_path / "run.yaml", "--json")
    flat = " ".join(output.split())
    assert code == 0, output
    assert flat.count("'zebra' is unknown to the tokenizer (2 captions)") == 1
    assert flat.count("'dog' is unknown to the tokenizer (1 caption)") == 1
    assert "cut more than 20% of 1 image(s) away" in flat and "wide.png: the model saw 33% of it" in flat
    assert "square.png" not in flat
    summary = json_line(output)
    assert summary["captions_with_unknown_words"] == 2 and summary["cropped_images"] == 1
    code, output = invoke("inspect", tmp_path / "run", "--json")
    report = json.loads(output)
    assert report["unknown_words"] == {"captions": 2, "searched": 2, "words": {"zebra": 2, "dog": 1}}
    (cropped,) = report["cropped_images"]["images"]
    assert cropped["image"] == "wide.png" and cropped["seen_share"] == pytest.approx(1 / 3)
    # padded, the model sees all of the image: nothing to warn about, and the run refuses to mix the two
    expect(["attribute", tmp_path / "run.yaml", "image.resize=pad"], 2, r"image.resize: \"native\" -> \"pad\"")
    code, output = invoke("attribute", tmp_path / "run.yaml", "image.resize=pad", "output.directory=padded", "--json")
    assert code == 0 and json_line(output)["cropped_images"] == 0
    with RunReader(tmp_path / "padded") as padded:
        assert padded.preprocessing(0).crop_box == pytest.approx((0, -64, 192, 128))
        assert padded.config["image"]["resize"] == "pad"
