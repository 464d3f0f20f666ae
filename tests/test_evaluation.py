"""Grounding metrics on hand-made maps with known answers, and `xclip evaluate` on planted run files."""

from __future__ import annotations

import json

import h5py
import numpy as np
from helpers import plant_map, plant_phrase_maps, synthetic_run
import pytest
from typer.testing import CliRunner

from xclip.cli.app import app
from xclip.analysis.grounding import (
    DIRECTIONS,
    METRICS,
    PhraseScore,
    _chart,
    bar_charts,
    box_weights,
    chance_levels,
    failure_patterns,
    read_annotations,
    summarize,
)
from xclip.core.geometry import Preprocessing
from xclip.analysis.box_metrics import energy_in_box, mass_ratio, pointing_game
from xclip.analysis.summaries import bootstrap_ci
from xclip.errors import ConfigError
from xclip.store.reader import RunReader

runner = CliRunner()
INSIDE = np.zeros((4, 4), dtype=bool)
INSIDE[:2, :2] = True


def test_pointing_game():
    peaked_inside = np.zeros((4, 4))
    peaked_inside[1, 1] = 5.0
    assert pointing_game(peaked_inside, INSIDE) == 1.0
    peaked_outside = -np.ones((4, 4))
    peaked_outside[3, 3] = 0.5
    assert pointing_game(peaked_outside, INSIDE) == 0.0


def test_energy_in_box_counts_positive_mass_only():
    values = np.zeros((4, 4))
    values[0, 0], values[3, 3], values[2, 2] = 3.0, 1.0, -10.0
    assert energy_in_box(values, INSIDE) == pytest.approx(0.75)
    assert energy_in_box(-np.ones((4, 4)), INSIDE) == 0.0


def test_mass_ratio_signs():
    perfect = np.where(INSIDE, 1.0, -1.0)  # positive inside, negative outside: all correct
    assert mass_ratio(perfect, INSIDE) == 1.0
    assert mass_ratio(-perfect, INSIDE) == 0.0  # negative inside, positive outside: all wrong
    uniform = np.ones((4, 4))  # positive everywhere: correct share is the box's share of the area
    assert mass_ratio(uniform, INSIDE) == pytest.approx(4 / 16)
    values = np.zeros((4, 4))
    values[0, 0], values[3, 3] = 2.0, -2.0  # positive in, negative out
    values[0, 1], values[2, 3] = -1.0, 1.0  # negative in, positive out
    assert mass_ratio(values, INSIDE) == pytest.approx(4 / 6)
    assert mass_ratio(np.zeros((4, 4)), INSIDE) == 0.5


def test_bootstrap_interval():
    samples = np.array([0.0, 1.0] * 50)
    low, high = bootstrap_ci(samples, seed=1)
    assert low < 0.5 < high and high - low < 0.3
    assert bootstrap_ci(np.full(10, 0.7)) == pytest.approx((0.7, 0.7))


def test_intervals_and_paired_differences_keep_their_seeded_resamples():
    from xclip.analysis.summaries import mean_interval, paired_difference

    values, reference = np.linspace(0.0, 1.0, 12), np.linspace(0.0, 1.0, 12) ** 2
    summary = mean_interval(values, seed=3)
    assert (summary.mean, summary.n) == (pytest.approx(0.5), 12)
    assert summary.ci95 == list(bootstrap_ci(values, seed=3))  # a report's interval is the seed's bootstrap
    assert summary.ci95 == pytest.approx([0.325568181818182, 0.681818181818182], abs=1e-12)  # the same, every time
    assert summary.record() == {"mean": summary.mean, "ci95": summary.ci95, "n": 12}
    difference = paired_difference(values, reference, seed=3)
    assert difference == mean_interval(values - reference, seed=3)  # resampled phrase by phrase, together
    assert paired_difference(values, values).record() == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 12}


def test_boxes_are_split_by_what_the_model_saw():
    from xclip.analysis.grounding import boxes_in_view

    # x 16..48 of a 64 x 32 image stays after the centre crop
    crop = Preprocessing.resize_then_crop((64, 32), (64, 32), (16, 0), (32, 32), (4, 4))
    inside, clipped, outside = [20, 0, 30, 10], [0, 0, 24, 10], [50, 0, 60, 10]
    boxes = boxes_in_view([inside, clipped, outside, clipped], crop)
    assert (boxes.seen, boxes.outside, boxes.n_clipped) == ([inside, clipped, clipped], [outside], 2)


def synthetic_report() -> dict:
    """Three classes of 20 phrases; "circle" scores near 1, where a legend inside the axes would lie."""
    rng = np.random.default_rng(0)
    scores = []
    for label, level in (("square", 0.5), ("star", 0.7), ("circle", 0.97)):
        for n in range(20):
            values = {f"{d}/{m}": float(np.clip(level + rng.normal(0, 0.05), 0, 1)) for d in DIRECTIONS for m in METRICS}
            chance = {f"{d}/{m}": level for d in DIRECTIONS for m, level in chance_levels(INSIDE).items()}
            scores.append(PhraseScore(n, label, label, values, chance))
    return summarize(scores)


def test_a_chart_for_every_metric_with_its_chance_level(tmp_path):
    report = synthetic_report()
    charts = bar_charts(report, tmp_path)
    assert sorted(p.name for p in charts) == sorted(f"{d}_{m}.png" for d in DIRECTIONS for m in METRICS)
    assert all(p.is_file() for p in charts)
    # a random map's expected score: the box touches 4 of 16 patches, covers 4/16 of the area; random signs: 0.5
    assert report["overall"]["phrase_to_image/pointing_game"]["chance"] == pytest.approx(4 / 16)
    assert report["per_class"]["star"]["phrase_to_image/energy_in_box"]["chance"] == pytest.approx(4 / 16)
    assert report["per_class"]["circle"]["box_to_phrase/mass_ratio"]["chance"] == 0.5
    weights = np.zeros((4, 4))
    weights[0, :2] = [1.0, 0.5]
    assert chance_levels(weights) == {"pointing_game": 2 / 16, "energy_in_box": 1.5 / 16, "mass_ratio": 0.5}


@pytest.mark.parametrize("metric", [f"{d}/{m}" for d in DIRECTIONS for m in METRICS])
def test_the_legend_hides_no_bar_whisker_or_line(metric):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    figure = _chart(synthetic_report(), metric)
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    (legend,) = figure.legends
    box = legend.get_window_extent(renderer)
    (axes,) = figure.axes
    assert len(axes.patches) == 3 and len(axes.collections) >= 2  # bars; whiskers and chance dashes
    extents = [artist.get_window_extent(renderer) for artist in (*axes.patches, *axes.lines)]
    for lines in axes.collections:  # whiskers and chance dashes: their segments' ends on the canvas
        ends = lines.get_transform().transform(np.concatenate(lines.get_segments()))
        extents.append(Bbox([ends.min(0), ends.max(0)]))
    for extent in extents:
        assert not box.overlaps(extent), extent
    assert {text.get_text() for text in legend.get_texts()} == {"mean, 95 % interval", "chance", "overall mean"}


def test_box_weights_map_boxes_through_the_preprocessing():
    # a 64 x 32 image, resized so the short side is 32 and centre-cropped to 32 x 32: x 16..48 stays
    crop = Preprocessing.resize_then_crop((64, 32), (64, 32), (16, 0), (32, 32), (4, 4))
    weights = box_weights([[16, 0, 32, 32]], crop).reshape(4, 4)  # the left half of the crop
    assert (weights[:, :2] == 1).all() and not weights[:, 2:].any()
    squash = Preprocessing.resize_then_crop((64, 32), (32, 32), (0, 0), (32, 32), (4, 4))
    weights = box_weights([[0, 0, 32, 16]], squash).reshape(4, 4)  # top-left quarter of the original
    assert (weights[:2, :2] == 1).all() and weights.sum() == 4
    # a box smaller than a patch (16 x 8 original pixels) covers its share, not 0 or 1
    weights = box_weights([[2, 1, 6, 5]], squash).reshape(4, 4)
    assert weights[0, 0] == pytest.approx(16 / 128) and weights.sum() == pytest.approx(16 / 128)


def test_bad_annotations_name_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"image": "x.png", "caption": "a red dog", "phrases": [
        {"text": "red dog", "start": 0, "end": 7, "boxes": [[0, 0, 1, 1]]}]}) + "\n")
    with pytest.raises(ConfigError, match="a.jsonl:1: span 0:7 of the caption is not 'red dog'"):
        read_annotations(path)


@pytest.mark.parametrize("correct", [True, False])
def test_evaluate_scores_planted_maps(tmp_path, model_dirs, correct):
    run_file, annotations = synthetic_run(tmp_path, model_dirs)
    plant_phrase_maps(run_file, annotations, model_dirs, correct=correct)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(tmp_path / "scenes" / "annotations.jsonl")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "report.json").read_text())
    overall = report["overall"]
    assert overall["n_phrases"] == sum(len(r["phrases"]) for r in annotations)
    if correct:
        assert overall["phrase_to_image/pointing_game"]["mean"] == 1.0
        # patches at a box's edge are partly outside it: they count inside by the share the box covers
        geometry = Preprocessing((32, 32), (0.0, 0.0, 32.0, 32.0), (32, 32), (4, 4))
        shares = [box_weights(p["boxes"], geometry) for r in annotations for p in r["phrases"]]
        expected = np.mean([w[w > 0].mean() for w in shares])  # 1 on each touched patch, inside by its share
        assert overall["phrase_to_image/mass_ratio"]["mean"] == pytest.approx(expected)
        assert overall["phrase_to_image/energy_in_box"]["mean"] == pytest.approx(expected)
        assert overall["box_to_phrase/pointing_game"]["mean"] >= 0.9  # boxes may share a patch
    else:
        assert overall["phrase_to_image/pointing_game"]["mean"] == 0.0
        assert overall["phrase_to_image/mass_ratio"]["mean"] == 0.0
    assert set(report["per_class"]) <= {"circle", "square", "triangle", "star", "cross"}
    assert (tmp_path / "run" / "evaluation" / "phrase_to_image_pointing_game.png").is_file()


def test_flickr30k_entities_converter(tmp_path):
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "42.txt").write_text(
        "[/EN#1/people A man] in [/EN#2/clothing/other a blue shirt] holds [/EN#0/notvisual something] .\n"
    )
    (tmp_path / "Annotations" / "42.xml").write_text(
        "<annotation><size><width>100</width><height>80</height></size>"
        "<object><name>1</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>51</xmax><ymax>61</ymax></bndbox></object>"
        "<object><name>2</name><name>1</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "<object><name>3</name><nobndbox>1</nobndbox></object></annotation>"
    )
    result = runner.invoke(app, ["convert", "flickr30k-entities", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (record,) = read_annotations(tmp_path / "out" / "annotations.jsonl")
    assert record["image"] == "42.jpg" and record["caption"] == "A man in a blue shirt holds something ."
    man, shirt = record["phrases"]
    assert (man["text"], man["class"], man["boxes"]) == ("A man", "people", [[10, 20, 50, 60], [0, 0, 4, 4]])
    assert (shirt["text"], shirt["class"], shirt["boxes"]) == ("a blue shirt", "clothing", [[0, 0, 4, 4]])
    assert json.loads((tmp_path / "out" / "metadata.jsonl").read_text()) == {"file_name": "42.jpg", "text": record["caption"]}


def test_coco_instances_converter(tmp_path):
    instances = {
        "images": [{"id": 5, "file_name": "5.jpg"}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [{"image_id": 5, "category_id": 1, "bbox": [10, 20, 30, 40]},
                        {"image_id": 5, "category_id": 1, "bbox": [0, 0, 5, 5]}],
    }
    captions = {"annotations": [{"id": 1, "image_id": 5, "caption": "Two dogs and a cat on grass."}]}
    (tmp_path / "i.json").write_text(json.dumps(instances))
    (tmp_path / "c.json").write_text(json.dumps(captions))
    result = runner.invoke(app, ["convert", "coco-instances", str(tmp_path / "i.json"), str(tmp_path / "out"),
                                 "--captions", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    (record,) = read_annotations(tmp_path / "out" / "annotations.jsonl")
    (dog,) = record["phrases"]  # no cat instance in the image: no phrase for "cat"
    assert (dog["text"], dog["start"], dog["boxes"]) == ("dogs", 4, [[10, 20, 40, 60], [0, 0, 5, 5]])
    missing = runner.invoke(app, ["convert", "coco-instances", str(tmp_path / "i.json"), str(tmp_path / "out")])
    assert missing.exit_code == 2 and "needs --captions" in missing.output


@pytest.mark.slow  # a run and an evaluation
def test_a_planted_miss_is_listed_first_with_its_link_and_counted_in_its_patterns(tmp_path, model_dirs):
    run_file, annotations = synthetic_run(tmp_path, model_dirs)
    plant_phrase_maps(run_file, annotations, model_dirs, correct=True)
    # one phrase of one pair planted wrong: its map lies wholly outside its boxes
    index, record = next((k, r) for k, r in enumerate(annotations) if len(r["phrases"]) >= 2)
    phrase = record["phrases"][0]
    geometry = Preprocessing((32, 32), (0.0, 0.0, 32.0, 32.0), (32, 32), (4, 4))
    with RunReader(run_file) as run:
        rows = run.caption_tokens(run.pair_inputs(index)[0]).rows_overlapping(phrase["start"], phrase["end"])
    with h5py.File(run_file, "r+") as f:
        planted = f["pairs/interactions"][index].astype(np.float64)
        planted[rows, 1:] = np.where(box_weights(phrase["boxes"], geometry) > 0, 0.0, 1.0)
        plant_map(f, index, planted)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(tmp_path / "scenes" / "annotations.jsonl"),
                                 "--misses", "3"])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "run" / "evaluation" / "misses.json").read_text())
    (miss,) = found["misses"]  # every other phrase's map is in its box
    assert (miss["pair"], miss["phrase"], miss["energy_in_box"]) == (index, phrase["text"], 0.0)
    x0, y0, x1, y1 = (round(v * 320 / 32) for v in phrase["boxes"][0])  # the viewer shows the 32-pixel image 320 wide
    words = phrase["text"].replace(" ", "%20")
    assert miss["link"] in (f"#pair={index}&span={words}&box={x0},{y0},{x1},{y1}",
                            f"#pair={index}&span={words}&at={rows[0]}&box={x0},{y0},{x1},{y1}")
    assert f"http://127.0.0.1:8765/{miss['link']}" in result.output.replace("\n", "")
    # the patterns count it where it belongs: among phrases of captions naming its number of objects
    named = len(record["phrases"])
    group = "4 or more objects named" if named >= 4 else f"{named} objects named"
    counts = {row["group"]: row for row in found["patterns"]["objects_named"]}
    n_group = sum(min(len(r["phrases"]), 4) == min(named, 4) for r in annotations for _ in r["phrases"])
    assert counts[group]["n_phrases"] == n_group
    assert counts[group]["pointing_game"] == pytest.approx(1 - 1 / n_group)
    assert all(row["pointing_game"] == 1.0 for name, row in counts.items() if name != group)


def test_failure_patterns_group_phrases_by_size_count_and_class():
    def score(game: float, size: float, named: int, shares: bool) -> PhraseScore:
        return PhraseScore(0, "p", "c", {"phrase_to_image/pointing_game": game}, {"phrase_to_image/energy_in_box": size},
                           n_phrases=named, shares_class=shares)

    scores = [score(0.0, 0.01, 1, False), score(1.0, 0.02, 1, False), score(1.0, 0.05, 2, True),
              score(1.0, 0.06, 2, True), score(1.0, 0.20, 5, False), score(0.0, 0.30, 5, True)]
    patterns = failure_patterns(scores)
    assert [(r["n_phrases"], r["pointing_game"]) for r in patterns["object_size"]] == [(2, 0.5), (2, 1.0), (2, 0.5)]
    assert [(r["group"], r["pointing_game"]) for r in patterns["objects_named"]] == [
        ("1 object named", 0.5), ("2 objects named", 1.0), ("4 or more objects named", 0.5)]  # no caption named 3
    assert [r["pointing_game"] for r in patterns["same_class_named"]] == [2 / 3, 2 / 3]


def _annotated_run(tmp_path, model_dirs):
    """A planted-correct run and its annotation records, with the scenes' annotations file path."""
    run_file, annotations = synthetic_run(tmp_path, model_dirs)
    plant_phrase_maps(run_file, annotations, model_dirs, correct=True)
    return run_file, annotations, tmp_path / "scenes" / "annotations.jsonl"


def _append(path, *records) -> list[int]:
    """Append records to an annotations file; returns their line numbers."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, *(json.dumps(r) for r in records)]) + "\n")
    return list(range(len(lines) + 1, len(lines) + len(records) + 1))


@pytest.mark.slow  # a run and an evaluation
def test_annotations_that_match_no_finished_pair_are_counted_listed_and_refused_with_strict(tmp_path, model_dirs):
    from xclip.store.schema import PENDING

    run_file, annotations, path = _annotated_run(tmp_path, model_dirs)
    first, second = annotations[0], annotations[1]
    typo_image = {**first, "image": "typo-" + first["image"]}
    typo_caption = {**second, "caption": second["caption"] + " ", "phrases": second["phrases"][:1]}
    lines = _append(path, typo_image, typo_caption)
    with h5py.File(run_file, "r+") as f:  # the last annotated pair is left unfinished
        f["pairs/status"][len(annotations) - 1] = PENDING
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "report.json").read_text())
    unmatched = report["unmatched_phrases"]
    n_first, n_last = len(first["phrases"]), len(annotations[-1]["phrases"])
    assert len(unmatched) == n_first + 1 + n_last
    by_line = {}
    for item in unmatched:
        by_line.setdefault(item["line"], set()).add(item["reason"])
    assert by_line == {len(annotations): {"pair not finished"}, lines[0]: {"no such image in the run"},
                       lines[1]: {"no such caption for that image in the run"}}
    assert report["overall"]["n_phrases"] == sum(len(r["phrases"]) for r in annotations) - n_last
    output = " ".join(result.output.split())
    assert f"{len(unmatched)} annotated phrase(s)" in output and "report.json lists all" in output
    assert f"line {lines[0]}: phrase {first['phrases'][0]['text']!r}" in output
    assert "(too few)" in output  # classes of few phrases: their intervals are marked

    strict_out = tmp_path / "strict"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(path), "--strict", "--out", str(strict_out)])
    assert result.exit_code == 2
    assert f"--strict: {len(unmatched)} annotated phrase(s)" in " ".join(result.output.split())
    assert f"line {len(annotations)}:" in result.output
    assert not strict_out.exists()


@pytest.mark.slow  # a run and an evaluation
def test_a_box_outside_what_the_model_saw_is_skipped_and_partly_outside_is_counted(tmp_path, model_dirs):
    run_file, annotations, path = _annotated_run(tmp_path, model_dirs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    target = next(k for k, r in enumerate(records) if len(r["phrases"]) >= 2)
    kept, lost = records[target]["phrases"][:2]
    kept["boxes"] = [*kept["boxes"], [40, 40, 50, 50]]  # a second box beyond the 32-pixel image: skipped
    lost["boxes"] = [[33, 0, 40, 8]]  # its only box outside: the phrase cannot be scored
    other = records[target + 1]["phrases"][0]
    other["boxes"] = [[*other["boxes"][0][:2], 40, 40]]  # partly outside: scored by the part inside, counted
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "evaluation" / "report.json").read_text())
    skipped = report["skipped_boxes"]
    assert [(b["line"], b["phrase"], b["box"]) for b in skipped] == [
        (target + 1, kept["text"], [40, 40, 50, 50]), (target + 1, lost["text"], [33, 0, 40, 8])]
    assert all(b["reason"].startswith("wholly outside the part of the image the model saw") for b in skipped)
    assert report["clipped_boxes"] == 1
    assert report["overall"]["n_phrases"] == sum(len(r["phrases"]) for r in annotations) - 1
    assert report["overall"]["phrase_to_image/pointing_game"]["mean"] == 1.0  # the kept phrase scored on its own box
    assert "2 box(es) lie wholly outside" in " ".join(result.output.split())
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(path), "--strict", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "2 box(es) lie wholly outside" in " ".join(result.output.split())


@pytest.mark.slow  # a run and an evaluation
def test_phrases_jsonl_holds_every_scored_phrase_with_its_values(tmp_path, model_dirs):
    _, annotations, path = _annotated_run(tmp_path, model_dirs)
    assert runner.invoke(app, ["evaluate", str(tmp_path / "run"), "-a", str(path)]).exit_code == 0
    folder = tmp_path / "run" / "evaluation"
    rows = [json.loads(line) for line in (folder / "phrases.jsonl").read_text().splitlines()]
    expected = [(k + 1, r["image"], r["caption"], p["text"], p["class"], p["boxes"])
                for k, r in enumerate(annotations) for p in r["phrases"]]
    assert sorted((row["line"], row["image"], row["caption"], row["phrase"], row["class"], row["boxes"]) for row in rows) == sorted(expected)
    report = json.loads((folder / "report.json").read_text())
    for key in (f"{d}/{m}" for d in DIRECTIONS for m in METRICS):
        assert np.mean([row[key] for row in rows]) == pytest.approx(report["overall"][key]["mean"])
        assert report["overall"][key]["n"] == len(rows)
    assert all(row["phrase_to_image/pointing_game"] == 1.0 for row in rows)


def test_intervals_say_their_n_and_mark_too_few():
    from xclip.analysis.summaries import MIN_N_FOR_INTERVAL, interval_text

    assert interval_text(0.988, [0.99, 0.99], 1) == "0.988 [0.99, 0.99] n=1 (too few)"
    assert interval_text(0.5, [0.4, 0.6], MIN_N_FOR_INTERVAL) == f"0.500 [0.40, 0.60] n={MIN_N_FOR_INTERVAL}"
    assert interval_text(-0.1, [-0.2, 0.0], 3, signed=True) == "-0.100 [-0.20, +0.00] n=3 (too few)"
    report = synthetic_report()
    report["per_class"]["square"]["phrase_to_image/pointing_game"]["n"] = 2
    axes = _chart(report, "phrase_to_image/pointing_game").axes[0]
    ticks = [t.get_text() for t in axes.get_xticklabels()]
    assert ticks == ["circle\nn=20", "square\nn=2 (too few)", "star\nn=20"]


def test_a_failed_report_write_keeps_the_earlier_report_and_names_the_file(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from xclip.errors import StoreError
    from xclip.disk.files import write_text_atomically

    target = tmp_path / "report.json"
    write_text_atomically(target, '{"good": 1}\n')
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".report.json.tmp-"):
            real(self, "{", encoding="utf-8")  # part of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(StoreError, match=f"not enough disk space for {target}"):
        write_text_atomically(target, '{"new": 2}\n')
    assert target.read_text() == '{"good": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
