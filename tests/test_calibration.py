"""Panel layouts: calibration finds a planted rough stretch, a calibrated layout is found for its weights and
settings only, and `xclip calibrate` feeds `xclip attribute` end to end."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import pytest
import torch
from helpers import DEMO_MODEL, write_demo_folder, write_pipeline_config
from typer.testing import CliRunner

import xclip
from xclip.run.calibration import _calibrate_tower, calibrate
from xclip.cli.app import app
from xclip.core.quadrature import DEFAULT_BREAKPOINTS
from xclip.errors import ConfigError
from xclip.attribution.panels import LAYOUT_FILE, PanelLayout, cache_file, find_layout, save_calibration, weights_fingerprint

runner = CliRunner()


def test_the_search_finds_a_planted_pair_of_breakpoints():
    # a planted cost: 3 nodes per panel, and 30 more unless one breakpoint lies in each of two narrow windows
    windows = [(0.74, 0.78), (0.82, 0.86)]

    def passes_of(layout: tuple[float, ...]) -> list[int]:
        missed = sum(not any(lo <= b <= hi for b in layout) for lo, hi in windows)
        return [3 * (len(layout) + 1) + 30 * missed] * 4

    found = _calibrate_tower(passes_of, lambda _done: None)
    assert found.chosen_passes == (9.0, 9)  # two breakpoints, one in each window: the optimum
    assert all(any(lo <= b <= hi for b in found.breakpoints) for lo, hi in windows)
    assert found.default_passes == (42.0, 42) and found.n_inputs == 4


def test_a_fingerprint_names_the_weights_not_the_dtype(model_dirs):
    fingerprints = {dtype: weights_fingerprint(xclip.load_model(model_dirs["clip"], dtype=dtype, device="cpu"))
                    for dtype in ("float32", "float64", "bfloat16")}
    assert len(set(fingerprints.values())) == 1
    assert weights_fingerprint(xclip.load_model(model_dirs["siglip"], device="cpu")) != fingerprints["float32"]
    changed = xclip.load_model(model_dirs["clip"], device="cpu")
    with torch.no_grad():
        next(changed.model.parameters()).mul_(1.5)
    assert weights_fingerprint(changed) != fingerprints["float32"]


def demo_copy(tmp_path):
    """The demo checkpoint without its shipped layout: an uncalibrated trained model."""
    copy = tmp_path / "demo-checkpoint"
    shutil.copytree(DEMO_MODEL, copy, ignore=shutil.ignore_patterns(LAYOUT_FILE))
    return copy


@pytest.mark.slow  # calibrates the demo model
def test_a_layout_is_used_for_its_weights_and_settings_only(tmp_path, model_dirs):
    model = xclip.load_model(demo_copy(tmp_path), dtype="float64", device="cpu")
    captions = ["a red circle", "a blue square and a green star"]
    from xclip.analysis.synthetic import generate

    images = [scene.image for scene in generate(2, seed=60_000)]
    calibration = calibrate(model, captions, images)
    assert xclip.InteractionAttribution(model).panel_layout == PanelLayout()  # nothing saved yet
    save_calibration(cache_file(weights_fingerprint(model)), model, calibration)

    attributor = xclip.InteractionAttribution(model)
    assert attributor.panel_layout.is_calibrated
    assert (attributor.panel_layout.text, attributor.panel_layout.image) == (calibration.text, calibration.image)
    # what calibration measured is what the attribution now spends
    text_passes = sum(c.n_nodes + c.n_endpoints for c in attributor.text_contributions(captions)) / len(captions)
    assert text_passes == pytest.approx(calibration.measured["text"]["passes_mean"], abs=0.01)
    image_passes = sum(c.n_nodes + c.n_endpoints for c in attributor.image_contributions(images)) / len(images)
    assert image_passes == pytest.approx(calibration.measured["image"]["passes_mean"], abs=0.01)
    # another reference moves the path: the layout is not used
    assert not xclip.InteractionAttribution(model, image_reference="blur").panel_layout.is_calibrated
    # other weights do not find it
    other = xclip.load_model(model_dirs["clip"], device="cpu")
    assert not find_layout(other, calibration.settings).is_calibrated
    # and a layout file named for other weights is refused, naming both fingerprints
    with pytest.raises(ConfigError, match="calibrated for other weights"):
        xclip.InteractionAttribution(other, panel_layout=cache_file(weights_fingerprint(model)))
    # default ignores it
    assert xclip.InteractionAttribution(model, panel_layout="default").panel_layout == PanelLayout()


@pytest.mark.slow  # calibrates the demo model
def test_calibrate_then_attribute_end_to_end(tmp_path, _layout_cache, monkeypatch):
    write_demo_folder(tmp_path, 3)
    checkpoint = demo_copy(tmp_path)
    config = write_pipeline_config(tmp_path / "run.yaml", str(checkpoint), attribution={"n_steps": None})

    monkeypatch.setattr("xclip.cli.progress.LOG_INTERVAL_S", 0.0)  # a log line at every step, not every 30 s
    result = runner.invoke(app, ["calibrate", str(config), "--inputs", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # stderr is no terminal here, as under Slurm: plain lines say the work goes on, tower by tower
    for tower in ("text", "image"):
        counts = [int(n) for n in re.findall(rf"^calibrating {tower}: (\d+) layouts tried$", result.stderr, flags=re.M)]
        assert len(counts) > 1 and counts == sorted(counts), result.stderr
    assert report["layout_file"].startswith(str(_layout_cache))
    for tower in ("text", "image"):
        measured = report["measured"][tower]
        assert measured["inputs"] == 3 and measured["passes_mean"] < measured["default_passes_mean"]  # found a better one

    result = runner.invoke(app, ["attribute", str(config), "-q"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        used = json.loads(f.attrs["panel_layout"])
        passes = f["images/n_nodes"][:] + f["images/n_endpoints"][:]
    assert used["source"] == report["layout_file"]
    assert (used["text"], used["image"]) == (report["text"], report["image"])
    assert passes.mean() == pytest.approx(report["measured"]["image"]["passes_mean"], abs=0.01)  # the same 3 images
    inspected = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "run"), "--json"]).stdout)
    assert inspected["accuracy"]["panel_layout"] == used
    assert inspected["accuracy"]["images"]["map_error_bound_max"] <= 1e-3

    # --beside writes into the checkpoint folder, where the layout travels with it
    result = runner.invoke(app, ["calibrate", str(config), "--inputs", "1", "--beside", "-q"])
    assert result.exit_code == 0, result.output
    assert "calibrating" not in result.stderr  # --quiet
    assert (checkpoint / LAYOUT_FILE).is_file()


def test_calibrate_refuses_what_it_cannot_do(tmp_path, model_dirs):
    result = runner.invoke(app, ["calibrate", model_dirs["clip"]])
    assert result.exit_code == 2 and "give --data FOLDER" in result.output
    write_demo_folder(tmp_path, 2)
    fixed = write_pipeline_config(tmp_path / "run.yaml", str(DEMO_MODEL))  # n_steps: 6
    result = runner.invoke(app, ["calibrate", str(fixed)])
    assert result.exit_code == 2 and "attribution.n_steps" in result.output
    # a hub model has no folder to write beside: refused before anything is loaded (this one is not downloadable offline)
    result = runner.invoke(app, ["calibrate", "open_clip:ViT-B-32/openai", "--beside", "--data", str(tmp_path / "images")])
    assert result.exit_code == 2 and "--beside needs a local checkpoint folder" in " ".join(result.output.split())


def test_the_shipped_demo_model_uses_its_shipped_layout(demo_model):
    layout = xclip.InteractionAttribution(demo_model).panel_layout
    assert layout.is_calibrated and layout.source.endswith(LAYOUT_FILE)
    assert layout.image != DEFAULT_BREAKPOINTS
