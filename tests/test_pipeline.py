"""`xclip attribute`, `render` and `inspect` end to end on tiny local models and generated images."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from helpers import ROOT, DEMO_MODEL, code_blocks, demo_pairs, make_images, plant_map, section, write_demo_folder, write_pipeline_config
from PIL import Image
from typer.testing import CliRunner

import xclip
import xclip.models.random_models
from xclip.cli.app import app
from xclip.config import load_config
from xclip.run.data import read_dataset
from xclip.errors import ConfigError
from xclip.show.figures import map_colours
from xclip.run.runner import run
from xclip.store.reader import RunReader

runner = CliRunner()
CAPTIONS = ["a red dog", "two blue circle", "the cat on a green square"]


def write_folder(root: Path, n_images: int = 3, *, bad_image: bool = False, empty_caption: bool = False) -> Path:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, image in enumerate(make_images(n_images)):
        image.save(images / f"img{i}.png")
        lines.append({"file_name": f"img{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]})
    if bad_image:
        (images / "broken.png").write_bytes(b"not a png")
        lines.append({"file_name": "broken.png", "text": "a red dog"})
    if empty_caption:
        lines.append({"file_name": "img0.png", "text": "  "})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return images


@pytest.fixture()
def folder_config(tmp_path, model_dirs):
    write_folder(tmp_path)
    return write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"])


# --- config -----------------------------------------------------------------------------------------------
def test_config_errors_name_key_file_and_line(tmp_path, folder_config):
    text = folder_config.read_text().replace("steps: 6", "stpes: 6")
    folder_config.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if "stpes" in row)
    result = runner.invoke(app, ["attribute", str(folder_config)])
    assert result.exit_code == 2
    assert f"{folder_config}:{line}: attribution.n_stpes: unknown key; did you mean 'n_steps'?" in result.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("attribution.n_steps=abc", "attribution.n_steps: Input should be a valid integer"),
        ("attribution.rule=simpson", "attribution.rule: Input should be 'gauss-legendre', 'riemann-right' or 'midpoint'"),
        ("pairing.mode=every", "pairing.mode: Input should be 'given', 'all' or 'topk'"),
        ("model.dtype=float8", "model.dtype: Input should be"),
        ("steps", "override 'steps' must look like section.key=value"),
        ("data.metadata=", "data.format 'imagefolder' needs data.metadata"),
    ],
)
def test_bad_overrides_exit_2_with_the_problem(folder_config, override, message):
    result = runner.invoke(app, ["attribute", str(folder_config), override])
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ").replace("  ", " ") or message in result.output


def test_missing_section_and_bad_yaml(tmp_path, folder_config):
    data = yaml.safe_load(folder_config.read_text())
    del data["model"]
    folder_config.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["attribute", str(folder_config)])
    assert result.exit_code == 2 and "model: Field required" in result.output
    folder_config.write_text("model: [unclosed")
    result = runner.invoke(app, ["attribute", str(folder_config)])
    assert result.exit_code == 2 and "invalid YAML" in result.output
    result = runner.invoke(app, ["attribute", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read config" in result.output


def test_overrides_reach_the_runner(folder_config, monkeypatch):
    seen = {}

    def fake_run(config, **kwargs):
        seen["config"] = config
        raise xclip.StoreError("stop here")

    monkeypatch.setattr("xclip.run.runner.run", fake_run)
    result = runner.invoke(app, ["attribute", str(folder_config), "attribution.n_steps=20", "pairing.mode=all"])
    assert result.exit_code == 1 and "stop here" in result.output
    config = seen["config"]
    assert config.attribution.n_steps == 20 and config.pairing.mode == "all"
    assert config.output.directory == (folder_config.parent / "run").resolve()  # relative to the config file


# --- inputs -----------------------------------------------------------------------------------------------
def test_every_input_format(tmp_path):
    images = write_folder(tmp_path)
    base = {"root": images}
    folder = read_dataset(load_config(write_pipeline_config(tmp_path / "a.yaml", "m"), []).data)
    assert folder.captions == CAPTIONS and [p.name for p in folder.images] == ["img0.png", "img1.png", "img2.png"]
    assert folder.given_pairs == [(0, 0), (1, 1), (2, 2)]

    (images / "pairs.tsv").write_text("filepath\ttitle\nimg1.png\ta red dog\nimg0.png\ta red dog\n")
    csv_config = xclip.config.DataConfig(format="csv", metadata=images / "pairs.tsv", csv_separator="\t", **base)
    tsv = read_dataset(csv_config)
    assert tsv.captions == ["a red dog"] and [p.name for p in tsv.images] == ["img1.png", "img0.png"]
    assert tsv.given_pairs == [(0, 0), (0, 1)]

    (images / "img0.txt").write_text("first caption\nsecond caption\n")
    (images / "img2.txt").write_text("third caption\n")
    sidecar = read_dataset(xclip.config.DataConfig(format="sidecar", **base))
    assert sidecar.captions == ["first caption", "second caption", "third caption"]
    assert sidecar.given_pairs == [(0, 0), (1, 0), (2, 1)] and [p.name for p in sidecar.images] == ["img0.png", "img2.png"]

    coco = {
        "images": [{"id": 7, "file_name": "img2.png"}, {"id": 3, "file_name": "img0.png"}],
        "annotations": [{"id": 1, "image_id": 7, "caption": "a cat"}, {"id": 2, "image_id": 3, "caption": "a dog "}],
    }
    (images / "coco.json").write_text(json.dumps(coco))
    from_coco = read_dataset(xclip.config.DataConfig(format="coco", metadata=images / "coco.json", **base))
    assert from_coco.captions == ["a dog", "a cat"] and [p.name for p in from_coco.images] == ["img0.png", "img2.png"]

    queries = read_dataset(xclip.config.DataConfig(format="queries", queries=["a dog", "a cat"], **base))
    assert len(queries.given_pairs) == 2 * 3


def test_image_paths_may_not_escape_the_root(tmp_path):
    images = write_folder(tmp_path)
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "../../etc/passwd", "text": "x"}) + "\n")
    with pytest.raises(ConfigError, match="escapes the data root"):
        read_dataset(xclip.config.DataConfig(format="imagefolder", root=images, metadata=images / "metadata.jsonl"))
    (images / "metadata.jsonl").write_text('{"file_name": "img0.png"}\n')
    with pytest.raises(ConfigError, match=r"every record was rejected:\n  .*metadata.jsonl:1: the record has no 'text'"):
        read_dataset(xclip.config.DataConfig(format="imagefolder", root=images, metadata=images / "metadata.jsonl"))


# --- runs -------------------------------------------------------------------------------------------------
def read_all(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_run_matches_the_library(tmp_path, model_dirs, family):
    write_folder(tmp_path)
    config = load_config(write_pipeline_config(tmp_path / "run.yaml", model_dirs[family], pairing={"mode": "all"}), [])
    summary = run(config)
    assert (summary.n_pairs, summary.n_done, summary.n_failed) == (9, 9, 0)
    model = xclip.load_model(model_dirs[family], device="cpu", dtype="float64")
    images = [Image.open(tmp_path / "images" / f"img{i}.png") for i in range(3)]
    expected = xclip.InteractionAttribution(model, n_steps=6).attribute(CAPTIONS, images)
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        pairs = f["pairs"]
        assert pairs["interactions"].dtype == np.float64  # a float64 run stores float64: as exact as the API
        for index, m in enumerate(expected):
            rows, columns = m.interactions.shape
            stored = pairs["interactions"][index]
            np.testing.assert_allclose(stored[:rows, :columns], m.interactions.numpy(), rtol=0, atol=1e-13)
            assert np.isnan(stored[rows:]).all()
            assert pairs["score"][index] == pytest.approx(m.score, abs=1e-13)
            assert pairs["completeness_error"][index] == pytest.approx(m.completeness_error, abs=1e-13)
            assert pairs["four_term_value"][index] == pytest.approx(m.four_term_value, abs=1e-13)
        n_tokens = f["captions/n_positions"][0]
        assert list(f["captions/tokens"].asstr()[0, :n_tokens]) == expected[0].row_labels
        assert tuple(f["images/original_size"][1]) == images[1].size
        assert json.loads(f.attrs["config"])["attribution"]["n_steps"] == 6
        assert f.attrs["model_family"] == family and len(f.attrs["model_weights_sha256"]) == 64
    with RunReader(tmp_path / "run") as stored_run:  # what readers get back instead of a tokenizer and processor
        for index, m in enumerate(expected):
            c, i = stored_run.pair_inputs(index)
            assert stored_run.caption_tokens(c) == m.caption_tokens and stored_run.preprocessing(i) == m.geometry


def test_topk_pairs_each_image_with_its_best_captions(tmp_path, model_dirs):
    write_folder(tmp_path)
    config = load_config(
        write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"], pairing={"mode": "topk", "k": 2}), []
    )
    run(config)
    model = xclip.load_model(model_dirs["clip"], device="cpu", dtype="float64")
    images = [Image.open(tmp_path / "images" / f"img{i}.png") for i in range(3)]
    scores = np.array([[m.score for m in xclip.InteractionAttribution(model, n_steps=1).attribute([c], images)] for c in CAPTIONS])
    expected = sorted((CAPTIONS[c], f"img{i}.png") for i in range(3) for c in np.argsort(-scores[:, i])[:2])
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:  # captions in no image's top k are not attributed
        texts, paths = f["captions/text"].asstr()[:], f["images/path"].asstr()[:]
        stored = sorted((texts[c], paths[i]) for c, i in zip(f["pairs/caption_index"][:], f["pairs/image_index"][:]))
        assert set(texts) == {caption for caption, _ in expected}
    assert stored == expected


def test_bad_items_are_recorded_and_the_rest_finishes(tmp_path, model_dirs):
    write_folder(tmp_path, bad_image=True, empty_caption=True)
    config_path = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"])
    result = runner.invoke(app, ["attribute", str(config_path), "--json", "-q"])
    assert result.exit_code == 3  # finished, some items failed
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["failed"], summary["rejected_records"], summary["done"]) == (1, 1, 3)
    report = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "run"), "--json"]).stdout)
    failures = "\n".join(report["failures"])
    assert "cannot read image" in failures and "broken.png" in failures
    assert re.search(r"record .*metadata.jsonl:5: 'text' is empty", failures)
    statuses = {(p["caption"], p["image"]): p["status"] for p in report["pairs"]}
    assert statuses[("a red dog", "broken.png")] == "failed" and statuses[("a red dog", "img0.png")] == "done"


def test_resume_after_interruption_gives_the_same_file(tmp_path, model_dirs):
    write_folder(tmp_path, n_images=4)
    straight = load_config(write_pipeline_config(tmp_path / "a.yaml", model_dirs["clip"], pairing={"mode": "all"}), [])
    run(straight)
    interrupted = load_config(
        write_pipeline_config(tmp_path / "b.yaml", model_dirs["clip"], pairing={"mode": "all"}, output={"directory": "run2"}), []
    )
    calls = []

    def stop_after_images() -> bool:
        calls.append(1)
        return len(calls) > 4  # stops partway through the images

    first = run(interrupted, should_stop=stop_after_images)
    assert first.is_interrupted and first.n_done < first.n_pairs
    second = run(interrupted)
    assert not second.is_interrupted and second.n_skipped == first.n_done
    a, b = read_all(tmp_path / "run" / "run.h5"), read_all(tmp_path / "run2" / "run.h5")
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert (a[name] == b[name]).all(), name


def test_changed_config_is_refused_unless_overwrite(tmp_path, folder_config):
    assert runner.invoke(app, ["attribute", str(folder_config), "-q"]).exit_code == 0
    result = runner.invoke(app, ["attribute", str(folder_config), "attribution.n_steps=7", "-q"])
    assert result.exit_code == 2 and "attribution.n_steps: 6 -> 7" in result.output and "--overwrite" in result.output
    again = runner.invoke(app, ["attribute", str(folder_config), "-q", "--json"])  # same config: nothing to do
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 3
    replaced = runner.invoke(app, ["attribute", str(folder_config), "attribution.n_steps=7", "-q", "--overwrite"])
    assert replaced.exit_code == 0
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert json.loads(f.attrs["config"])["attribution"]["n_steps"] == 7


def test_the_run_file_has_the_documented_datasets(tmp_path, folder_config):
    assert runner.invoke(app, ["attribute", str(folder_config), "-q"]).exit_code == 0
    table = section("docs/run-file.md", "Datasets")
    rows = re.findall(r"^\| `([\w/]+)` \| `\(([^)]*)\)` \| ([\w()]+) \|", table, flags=re.M)
    assert len(rows) >= 20
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        sizes = {"C": 3, "I": 3, "P": 3, "L": 77, "S": 17, "E": 16, "4": 4, "R": 0}
        documented = set()
        for name, shape, dtype in rows:
            documented.add(name)
            expected = tuple(sizes[s.strip()] if not s.strip().isdigit() else int(s) for s in shape.split(",") if s.strip())
            assert f[name].shape == expected, name
            fixed = re.fullmatch(r"str\((\d+)\)", dtype)
            kind = "S" if fixed else {"float32": "f", "float64": "f", "uint32": "u", "int8": "i", "int32": "i", "int64": "i", "bool": "b", "str": "O"}[dtype]
            assert f[name].dtype.kind == kind, name
            if fixed:
                assert f[name].dtype.itemsize == int(fixed.group(1)), name
        actual = set()
        f.visititems(lambda name, obj: actual.add(name) if isinstance(obj, h5py.Dataset) else None)
        assert actual == documented


def test_run_file_records_nodes_and_convergence_per_input(tmp_path):
    write_demo_folder(tmp_path, 3)
    config = write_pipeline_config(tmp_path / "run.yaml", str(DEMO_MODEL), attribution={"n_steps": None})
    result = runner.invoke(app, ["attribute", str(config), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["not_converged"] == 0
    model = xclip.load_model(DEMO_MODEL, device="cpu", dtype="float64")
    captions, paths = demo_pairs()
    attributor = xclip.InteractionAttribution(model)
    expected = {"captions": attributor.text_contributions(captions[:3]), "images": attributor.image_contributions(paths[:3])}
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        for group, items in expected.items():
            assert f[group]["n_nodes"][:].tolist() == [item.n_nodes for item in items]
            assert f[group]["is_converged"][:].all()
            np.testing.assert_allclose(
                f[group]["relative_completeness_error"][:], [item.relative_completeness_error for item in items], rtol=1e-4
            )
        relative, errors, bounds = (f["pairs"][name][:] for name in ("relative_completeness_error", "completeness_error", "completeness_bound"))
        assert (relative <= 2 * 1e-3 + 1e-6).all() and (errors <= bounds * (1 + 1e-4) + 1e-9).all()


def test_inputs_that_miss_the_tolerance_are_finished_flagged_and_listed(tmp_path):
    write_demo_folder(tmp_path, 4)
    attribution = {"n_steps": None, "max_steps": 12, "panel_layout": "default"}  # the first panels' nodes, no more
    config = write_pipeline_config(tmp_path / "run.yaml", str(DEMO_MODEL), attribution=attribution)
    result = runner.invoke(app, ["attribute", str(config), "--json"])
    assert result.exit_code == 0, result.output  # finished: the maps are written, the misses flagged
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["done"] == 4
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        flagged = {group: np.flatnonzero(~f[group]["is_converged"][:]).tolist() for group in ("captions", "images")}
        assert (f["captions/n_nodes"][:] == 12).all() and (f["images/n_nodes"][:] == 12).all()
        assert (f["pairs/status"][:] == 1).all()
        for group, indices in flagged.items():
            relative, bound = f[group]["relative_completeness_error"][:], f[group]["map_error_bound"][:]
            assert sorted(indices) == np.flatnonzero((relative > 1e-3) | (bound > 1e-3)).tolist()
    n_flagged = sum(len(indices) for indices in flagged.values())
    assert n_flagged >= 4 and summary["not_converged"] == n_flagged
    assert "missed the tolerance" in result.stderr and "attribution.max_steps" in result.stderr
    report = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "run"), "--json"]).stdout)
    listed = {(item["group"], item["index"]) for item in report["accuracy"]["not_converged"]}
    assert listed == {(group, i) for group, indices in flagged.items() for i in indices}
    assert report["accuracy"]["images"]["not_converged"] == len(flagged["images"])
    text = runner.invoke(app, ["inspect", str(tmp_path / "run")])
    assert f"{n_flagged} input(s) missed the tolerance 0.001" in text.stdout


def test_attribute_counts_and_names_the_inexact_pair_maps(tmp_path):
    """The demo model's first 40 demo pairs: the pairs whose map error bound passes 10 x the tolerance (a map small
    next to its inputs) are counted in the summary and named on stderr, also with --quiet."""
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = runner.invoke(app, ["attribute", str(config), f"output.directory={tmp_path / 'run'}", "data.limit=40",
                                 "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        bounds = f["pairs/map_error_bound"][:]
        captions, caption_index = f["captions/text"].asstr()[:], f["pairs/caption_index"][:]
    inexact = np.flatnonzero(bounds > 10 * 1e-3)
    assert 0 < inexact.size < bounds.size  # the trained model has such pairs, and most pairs are not
    assert json.loads(result.stdout)["inexact_pair_maps"] == inexact.size
    flat = " ".join(result.stderr.split())
    assert f"{inexact.size} pair map(s) may be off by more than 10 x the tolerance 0.001" in flat
    for p in inexact[:5]:
        assert f"pair {p} ({captions[caption_index[p]]} |" in flat
    assert "attribute their captions and images again with a tighter attribution.tolerance" in flat


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["attribution.n_steps=", "attribution.tolerance="], "give a tolerance to adapt to, or n_steps for a fixed rule"),
        (["attribution.n_steps=", "attribution.convention=reference"], "'reference' reproduces the paper's code's fixed rule"),
        (["attribution.n_steps=", "attribution.rule=midpoint"], "'midpoint' is for fixed-step comparisons"),
        (["attribution.n_steps=", "attribution.max_steps=8"], "attribution.max_steps: max_steps must be at least 12 (the first 4 panels of 3 nodes), got 8"),
    ],
)
def test_quadrature_settings_are_checked_before_the_model_loads(folder_config, overrides, message):
    result = runner.invoke(app, ["attribute", str(folder_config), *overrides])
    assert result.exit_code == 2
    assert message in result.output


# --- render and inspect -----------------------------------------------------------------------------------
def test_render_writes_heatmaps_and_follows_planted_maps(tmp_path, folder_config):
    assert runner.invoke(app, ["attribute", str(folder_config), "-q"]).exit_code == 0
    run_file = tmp_path / "run" / "run.h5"
    with h5py.File(run_file, "r+") as f:  # plant: the token "red" interacts only with the top-left patches
        interactions = f["pairs/interactions"][0]
        tokens = list(f["captions/tokens"].asstr()[0, : f["captions/n_positions"][0]])
        red = tokens.index("red</w>")
        planted = np.where(np.isnan(interactions), np.nan, 0.0)
        grid = np.zeros((4, 4))
        grid[:2, :2] = 1.0
        planted[red, 1:] = grid.reshape(-1)
        plant_map(f, 0, planted)
    result = runner.invoke(app, ["render", str(tmp_path / "run"), "--pair", "0", "--span", "red", "--upsample", "nearest"])
    assert result.exit_code == 0, result.output
    (path,) = [Path(line) for line in result.stdout.split()]
    with Image.open(path) as png:
        assert png.text["xclip:halfrange"] == "1"
        pixels = np.asarray(png.convert("RGB"))
    # the map panel holds the colour bar's ends where the plant is 1 and its middle where it is 0
    top = map_colours(np.array(1.0), 1.0)
    zero = map_colours(np.array(0.0), 1.0)
    assert (pixels == top).all(-1).sum() > 40 * 40 and (pixels == zero).all(-1).sum() > 3 * 40 * 40
    default = runner.invoke(app, ["render", str(tmp_path / "run")])
    written = [Path(line) for line in default.stdout.split()]
    assert [p.name for p in written] == ["pair000000.png", "pair000001.png", "pair000002.png"]
    box = runner.invoke(app, ["render", str(tmp_path / "run"), "--pair", "1", "--box", "0,0,20,20"])
    assert box.exit_code == 0 and Path(box.stdout.strip()).name == "pair000001_box-0-0-20-20.png"
    bad = runner.invoke(app, ["render", str(tmp_path / "run"), "--pair", "0", "--span", "zebra"])
    assert bad.exit_code == 2 and "does not occur in the caption" in bad.output


def test_span_selection_by_words_and_indices():
    from xclip.core.tokens import CaptionTokens

    tokens = CaptionTokens("a Black dog", ["<|startoftext|>", "a</w>", "bl", "ack</w>", "dog</w>", "<|endoftext|>"],
                           [(0, 0), (0, 1), (2, 4), (4, 7), (8, 11), (0, 0)], [True, False, False, False, False, True], [False] * 6)
    assert tokens.span_rows("black dog") == [2, 3, 4]  # case-insensitive, over the caption's own text
    assert tokens.span_rows("lac") == [2, 3]  # every token the span overlaps
    assert tokens.span_rows("2:4") == [2, 3]
    assert tokens.label([2, 3, 4]) == "Black dog"
    with pytest.raises(ConfigError, match="outside the caption"):
        tokens.span_rows("9")
    with pytest.raises(ConfigError, match="does not occur in the caption"):
        tokens.span_rows("cat")


def test_inspect_json_has_every_pair(tmp_path, folder_config):
    assert runner.invoke(app, ["attribute", str(folder_config), "-q"]).exit_code == 0
    result = runner.invoke(app, ["inspect", str(tmp_path / "run"), "--json"])
    report = json.loads(result.stdout)
    assert report["counts"]["pairs"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        for row in report["pairs"]:
            assert row["score"] == pytest.approx(float(f["pairs/score"][row["index"]]))
            assert row["terms"] == pytest.approx(f["pairs/terms"][row["index"]].tolist())
    text = runner.invoke(app, ["inspect", str(tmp_path / "run")])
    assert text.exit_code == 0 and "top 10 pairs by score" in text.stdout


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "xclip", "--help"], capture_output=True, text=True, check=True)
    for command in ("attribute", "render", "inspect"):
        assert command in result.stdout


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path, [])
        assert config.output.directory.is_absolute(), path


@pytest.mark.slow  # a subprocess signalled mid-run
def test_sigterm_stops_at_a_batch_boundary_and_the_rerun_finishes(tmp_path, model_dirs):
    import os
    import signal

    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i, image in enumerate(make_images(60, seed=5)):
        image.save(images / f"img{i:03d}.png")
        lines.append(json.dumps({"file_name": f"img{i:03d}.png", "text": CAPTIONS[i % 3]}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"], attribution={"n_steps": 10})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "xclip", "attribute", str(config), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert process.stderr is not None
    for line in process.stderr:  # plain progress lines, since stderr is not a terminal
        if line.startswith("images:"):
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["done"] < 60
    rerun = subprocess.run([sys.executable, "-m", "xclip", "attribute", str(config), "--json", "-q"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = json.loads(rerun.stdout)
    assert final["skipped"] == summary["done"] and final["skipped"] + final["done"] == 60


@pytest.mark.slow  # a run and its three shards
def test_shards_merge_into_the_unsharded_run(tmp_path, model_dirs, monkeypatch):
    write_folder(tmp_path, n_images=4)
    config = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"], pairing={"mode": "all"})
    assert runner.invoke(app, ["attribute", str(config), "-q", "output.directory=whole"]).exit_code == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # --array=1-5:2 -> ids 1, 3, 5 -> shard 1 of 3
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert runner.invoke(app, ["attribute", str(config), "-q", "--shard", "env"]).exit_code == 0
    assert (tmp_path / "run" / "shard-00001-of-00003" / "run.h5").is_file()
    incomplete = runner.invoke(app, ["merge", str(tmp_path / "run")])
    assert incomplete.exit_code == 1 and "1 of 3 shards" in incomplete.output
    for shard in ("0/3", "2/3"):
        assert runner.invoke(app, ["attribute", str(config), "-q", "--shard", shard]).exit_code == 0
    assert runner.invoke(app, ["merge", str(tmp_path / "run")]).exit_code == 0
    with h5py.File(tmp_path / "whole" / "run.h5", "r") as whole, h5py.File(tmp_path / "run" / "run.h5", "r") as merged:
        assert len(merged["pairs/status"]) == len(whole["pairs/status"]) == 12
        # equal to rounding: a shard's batches hold other inputs, and BLAS kernels chosen by batch size may sum in
        # another order (float64 here: 1e-15 relative, far below any quadrature error)
        whole_maps = whole["pairs/interactions"][:]
        np.testing.assert_allclose(merged["pairs/interactions"][:], whole_maps, rtol=0, atol=1e-12 * np.nanmax(np.abs(whole_maps)))
        for side, name in (("caption", "captions/text"), ("image", "images/path")):
            merged_names = merged[name].asstr()[:][merged[f"pairs/{side}_index"][:]]
            whole_names = whole[name].asstr()[:][whole[f"pairs/{side}_index"][:]]
            assert list(merged_names) == list(whole_names)
    report = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "run"), "--json"]).stdout)
    assert report["counts"]["pairs"]["done"] == 12
    bad = runner.invoke(app, ["attribute", str(config), "--shard", "3/2"])
    assert bad.exit_code == 2 and "shard_index 3 must be below" in bad.output


# what each launcher sets for its process of rank r of n (one node)
LAUNCHER_VARIABLES = {
    "torchrun": lambda rank, n: {"RANK": rank, "WORLD_SIZE": n, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": n},
    "srun": lambda rank, n: {"SLURM_PROCID": rank, "SLURM_NTASKS": n, "SLURM_LOCALID": rank, "SLURM_NNODES": 1},
}
SCHEDULER_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                       "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.mark.slow  # a run, then the launcher's ranks one after the other, merged
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_the_launcher_recipes_of_the_docs_work_as_pasted(tmp_path, model_dirs, monkeypatch, launcher):
    (recipe,) = code_blocks(section("docs/cluster.md", "Shards and `xclip merge`"), "text")
    lines = recipe.strip().splitlines()
    words = shlex.split(next(line for line in lines if line.startswith(launcher)))
    n_ranks = int(words[words.index("--nproc-per-node" if launcher == "torchrun" else "--ntasks") + 1])
    command = words[words.index("xclip") + 1 :]  # what the launcher runs in each of its processes
    assert command[0] == "attribute" and command[-2:] == ["--shard", "env"]
    write_folder(tmp_path, n_images=4)
    config = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"], model={"device": "auto"}, pairing={"mode": "all"})
    command = [str(config) if word.endswith(".yaml") else word for word in command]
    assert runner.invoke(app, ["attribute", str(config), "-q", "output.directory=whole"]).exit_code == 0
    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for rank in range(n_ranks):
        for name, value in LAUNCHER_VARIABLES[launcher](rank, n_ranks).items():
            monkeypatch.setenv(name, str(value))
        result = runner.invoke(app, [*command, "-q"])
        assert result.exit_code == 0, result.output
        with RunReader(tmp_path / "run" / f"shard-{rank:05d}-of-{n_ranks:05d}") as shard:
            assert shard.attrs["device"] == "cpu"  # the local rank names no GPU on a machine without one
    merge = shlex.split(lines[-1])
    assert merge[:2] == ["xclip", "merge"]
    assert runner.invoke(app, ["merge", str(tmp_path / "run")]).exit_code == 0
    with h5py.File(tmp_path / "whole" / "run.h5", "r") as whole, h5py.File(tmp_path / "run" / "run.h5", "r") as merged:
        for side, name in (("caption", "captions/text"), ("image", "images/path")):
            assert list(merged[name].asstr()[:][merged[f"pairs/{side}_index"][:]]) == list(
                whole[name].asstr()[:][whole[f"pairs/{side}_index"][:]])
        np.testing.assert_allclose(merged["pairs/score"][:], whole["pairs/score"][:], rtol=1e-12)
        assert (merged["pairs/status"][:] == 1).all()


def test_words_follow_the_captions_own_text():
    from xclip.core.tokens import CaptionTokens

    def words(caption, offsets, special=None):
        n = len(offsets)
        tokens = CaptionTokens(caption, ["t"] * n, offsets, special or [False] * n, [False] * n)
        return [(w.text, w.rows) for w in tokens.words()]

    # pieces of one word join (BPE, SentencePiece, WordPiece alike: only the spans matter); specials never do
    assert words("a black dog", [(0, 0), (0, 1), (2, 4), (4, 7), (8, 11), (0, 0)], [True, False, False, False, False, True]) == [
        ("a", [1]), ("black", [2, 3]), ("dog", [4])]
    # punctuation is a word of its own, and ends the word before it
    assert [w for w, _ in words("a red circle, x", [(0, 1), (2, 5), (6, 12), (12, 13), (14, 15)])] == ["a", "red", "circle", ",", "x"]
    # a token without a span (text the tokenizer changed) is shown by its token string
    assert words("é", [(0, 0)]) == [("t", [0])]


def test_new_weights_at_the_same_path_are_refused(tmp_path, model_dirs):
    import shutil

    write_folder(tmp_path)
    local = tmp_path / "model"
    shutil.copytree(model_dirs["clip"], local)
    config = write_pipeline_config(tmp_path / "run.yaml", str(local))
    assert runner.invoke(app, ["attribute", str(config), "-q"]).exit_code == 0
    xclip.models.random_models.save_random_model(local, "clip", seed=1)  # retrained in place
    result = runner.invoke(app, ["attribute", str(config), "-q"])
    assert result.exit_code == 2 and "other weights" in result.output
