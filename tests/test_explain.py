"""`xclip explain`: one image and its captions, no config file, the numbers of an equivalent `attribute` run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from test_bad_inputs import expect, invoke

from xclip.explain import DEMO_MODEL
from xclip.store import RunReader

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
        "model": {"name": str(DEMO_MODEL), "device": "cpu"},
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


def test_explain_errors_are_clear(tmp_path):
    expect(["explain", tmp_path / "missing.png", "a cat"], 2, r"image .*missing.png is not there")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    expect(["explain", tmp_path / "x.png", "a cat", "--scale", "-1"], 2, r"--scale must be figure, run or a positive number")
    expect(["explain", tmp_path / "x.png", ""], 2, r"caption")


def test_words_the_tokenizer_does_not_know_are_noted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = invoke("explain", SCENES / "scene00000.png", "a zebra star")  # the demo's vocabulary has no zebra
    # named by the caption's own word, not the unknown token's string
    assert code == 0 and "pair 0: zebra: unknown to the tokenizer" in " ".join(output.split())
