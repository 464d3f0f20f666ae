"""`xclip compare`: identical runs differ by zero, a planted change shows in its class only and by its closed
form, and runs over different pairs are refused with the reason."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import yaml
from helpers import plant_map, synthetic_run
from typer.testing import CliRunner

from xclip.cli.app import app
from xclip.analysis.comparison import compare_runs
from xclip.analysis.grounding import DIRECTIONS, METRICS, read_annotations, score_run
from xclip.store.reader import RunReader

runner = CliRunner()


@pytest.mark.slow  # two runs and a comparison
def test_two_runs_of_the_same_checkpoint_differ_by_exactly_zero(tmp_path, model_dirs):
    synthetic_run(tmp_path, model_dirs)
    again = yaml.safe_load((tmp_path / "run.yaml").read_text())
    again["output"]["directory"] = "again"
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(again))
    assert runner.invoke(app, ["attribute", str(tmp_path / "again.yaml"), "-q"]).exit_code == 0
    annotations = tmp_path / "scenes" / "annotations.jsonl"
    result = runner.invoke(app, ["compare", str(tmp_path / "run"), str(tmp_path / "again"), "-a", str(annotations),
                                 "--out", str(tmp_path / "compared")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "compared" / "comparison.json").read_text())
    for stats in [report["overall"], *report["per_class"].values()]:
        for direction in DIRECTIONS:
            for metric in METRICS:
                assert stats[f"{direction}/{metric}"]["B-A"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": stats["n_phrases"]}
    assert report["settings_differences"] == {"B-A": []}
    assert "settings of B that differ from A: none" in result.output
    assert len(list((tmp_path / "compared").glob("difference_*.png"))) == len(DIRECTIONS) * len(METRICS)


def test_a_planted_change_shows_in_its_class_only_and_by_its_closed_form(tmp_path, model_dirs):
    run_file, annotations = synthetic_run(tmp_path, model_dirs)
    changed = tmp_path / "changed"
    shutil.copytree(run_file.parent, changed)
    scores = score_run(run_file.parent, tmp_path / "scenes" / "annotations.jsonl")
    flipped_class = max({s.label for s in scores}, key=lambda label: sum(s.label == label for s in scores))
    # run B: the rows of every phrase of one class negated. A negated map's mass ratio is 1 - its mass ratio.
    with RunReader(run_file) as run:
        texts = run.captions()
        rows_of = {}
        for index in range(run.n_items("pairs")):
            caption = int(run.column("pairs", "caption_index")[index])
            record = next(r for r in annotations if r["caption"] == texts[caption])
            tokens = run.caption_tokens(caption)
            rows_of[index] = sorted({row for p in record["phrases"] if str(p["class"]) == flipped_class
                                     for row in tokens.rows_overlapping(p["start"], p["end"])})
    with h5py.File(changed / "run.h5", "r+") as f:
        for index, rows in rows_of.items():
            planted = f["pairs/interactions"][index]
            planted[rows] = -planted[rows]
            plant_map(f, index, planted)

    report = compare_runs([run_file.parent, changed], tmp_path / "scenes" / "annotations.jsonl")
    metric = "phrase_to_image/mass_ratio"
    for label, stats in report["per_class"].items():
        difference = stats[metric]["B-A"]["mean"]
        if label == flipped_class:
            assert difference == pytest.approx(1 - 2 * stats[metric]["A"]["mean"], abs=1e-12)
            assert difference != 0
        else:
            assert difference == 0.0  # a phrase's own rows alone make its phrase -> image map
    phrases = [s for s in scores if s.label == flipped_class]
    expected = np.mean([1 - 2 * s.values[metric] for s in phrases])
    assert report["overall"][metric]["B-A"]["mean"] == pytest.approx(expected * len(phrases) / len(scores), abs=1e-12)


def test_runs_over_different_pairs_are_refused_with_the_reason(tmp_path, model_dirs):
    synthetic_run(tmp_path, model_dirs)
    fewer = yaml.safe_load((tmp_path / "run.yaml").read_text())
    fewer["output"]["directory"] = "fewer"
    fewer["data"]["limit"] = 3
    (tmp_path / "fewer.yaml").write_text(yaml.safe_dump(fewer))
    assert runner.invoke(app, ["attribute", str(tmp_path / "fewer.yaml"), "-q"]).exit_code == 0
    annotations = tmp_path / "scenes" / "annotations.jsonl"
    result = runner.invoke(app, ["compare", str(tmp_path / "run"), str(tmp_path / "fewer"), "-a", str(annotations),
                                 "--out", str(tmp_path / "compared")])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "do not score the same phrases" in flat and "have no finished pair in" in flat and "(first:" in flat
    assert not (tmp_path / "compared" / "comparison.json").exists()
    result = runner.invoke(app, ["compare", str(tmp_path / "run"), "-a", str(annotations)])
    assert result.exit_code == 2 and "compare needs 2" in " ".join(result.output.split())
    assert len(read_annotations(annotations)) == 6


@pytest.mark.slow  # two runs and a comparison
def test_the_settings_two_runs_differ_in_are_listed_before_the_tables(tmp_path, model_dirs):
    synthetic_run(tmp_path, model_dirs)
    finer = yaml.safe_load((tmp_path / "run.yaml").read_text())
    finer["output"]["directory"] = "finer"
    finer["attribution"]["n_steps"] = 3
    (tmp_path / "finer.yaml").write_text(yaml.safe_dump(finer))
    assert runner.invoke(app, ["attribute", str(tmp_path / "finer.yaml"), "-q"]).exit_code == 0
    result = runner.invoke(app, ["compare", str(tmp_path / "run"), str(tmp_path / "finer"), "-a",
                                 str(tmp_path / "scenes" / "annotations.jsonl"), "--out", str(tmp_path / "compared")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "compared" / "comparison.json").read_text())
    assert report["settings_differences"] == {"B-A": ["attribution.n_steps: 2 -> 3"]}
    listed = result.output.index("  attribution.n_steps: 2 -> 3")
    assert result.output.index("settings of B that differ from A:") < listed < result.output.index("mean [95% CI] n")
