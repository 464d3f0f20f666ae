"""The files ``xclip evaluate`` and ``xclip compare`` write: a run's grounding report with its phrase rows, misses
and bar charts; first-order methods scored beside the run's maps; runs compared over the same phrases. Each call
writes into a folder and returns the report with the paths it wrote, for the caller to show."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xclip.analysis.baseline_evaluation import method_charts, score_methods, summarize_methods
from xclip.analysis.comparison import compare_runs, difference_charts
from xclip.analysis.grounding import (
    Evaluation,
    bar_charts,
    evaluate_annotations,
    left_out_lines,
    phrase_rows,
    summarize,
    write_misses,
)
from xclip.disk.files import write_text_atomically
from xclip.errors import ConfigError
from xclip.store.describe import inputs_read_report


@dataclass(frozen=True)
class GroundingReport:
    report: dict[str, Any]  # report.json: the metrics per class, what was left out, the inputs the model read in part
    evaluation: Evaluation  # the phrases scored, and those and the boxes that could not be
    misses: dict[str, Any]  # misses.json: every miss, worst first, and the failure patterns
    written: list[Path]  # report.json, phrases.jsonl, misses.json, then the bar charts


def write_grounding_report(run_dir: str | Path, annotations: Path, folder: Path, *, seed: int = 0,
                           strict: bool = False) -> GroundingReport:
    """Score the run's maps against ``annotations`` and write report.json, phrases.jsonl, misses.json and the bar
    charts into ``folder``. ``strict``: annotated phrases that match no finished pair and boxes wholly outside what
    the model saw are an error, raised before anything is written."""
    evaluation = evaluate_annotations(run_dir, annotations)
    if strict:
        _refuse_left_out(evaluation, annotations)
    scores = evaluation.scores
    report = summarize(scores, seed=seed)
    report["unmatched_phrases"] = [vars(u) for u in evaluation.unmatched_phrases]
    report["skipped_boxes"] = [{**vars(b), "box": list(b.box)} for b in evaluation.skipped_boxes]
    report["clipped_boxes"] = evaluation.n_clipped_boxes
    report["inputs_read"] = inputs_read_report(run_dir)  # truncated captions, unknown words, crops (xclip.attribution.inputs_read)
    write_text_atomically(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(folder / "phrases.jsonl", "".join(json.dumps(row) + "\n" for row in phrase_rows(scores)))
    charts = bar_charts(report, folder)
    found = write_misses(scores, folder / "misses.json", seed=seed)
    return GroundingReport(report, evaluation, found, [folder / "report.json", folder / "phrases.jsonl", folder / "misses.json", *charts])


def _refuse_left_out(evaluation: Evaluation, annotations: Path) -> None:
    """An error naming the first unmatched phrases and skipped boxes, if there are any."""
    n_unmatched, n_skipped = len(evaluation.unmatched_phrases), len(evaluation.skipped_boxes)
    if n_unmatched or n_skipped:
        first = "; ".join(left_out_lines(evaluation.unmatched_phrases, evaluation.skipped_boxes, 3))
        msg = (f"strict: {n_unmatched} annotated phrase(s) of {annotations} match no finished pair or no word the model "
               f"read, and {n_skipped} box(es) "
               f"lie wholly outside what the model saw (first: {first}); nothing was written")
        raise ConfigError(msg, setting="strict")


def worst_misses(misses: dict[str, Any], per_class: int) -> list[dict[str, Any]]:
    """The ``per_class`` worst misses of each class of ``misses`` (as :func:`write_grounding_report` returns them),
    class by class in alphabetical order."""
    listed: list[dict[str, Any]] = []
    for label in sorted({miss["label"] for miss in misses["misses"]}):
        listed += [miss for miss in misses["misses"] if miss["label"] == label][:per_class]
    return listed


def write_baselines_report(run_dir: str | Path, annotations: Path | None, folder: Path, names: list[str], *, target: str,
                           game: str, n_points: int, limit: int | None, seed: int = 0,
                           progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Score first-order methods ``names`` beside the run's maps (grounding with ``annotations``, and insertion and
    deletion faithfulness) and write baselines.json and its charts into ``folder``: the report, and the paths
    written."""
    scores = score_methods(run_dir, names, annotations=annotations, target=target, game=game,  # type: ignore[arg-type]
                           n_points=n_points, limit=limit, seed=seed, progress=progress)
    report = summarize_methods(scores, seed=seed)
    report["target"], report["game"], report["curve_points"] = target, game, n_points
    write_text_atomically(folder / "baselines.json", json.dumps(report, indent=2) + "\n")
    return report, [folder / "baselines.json", *method_charts(report, folder)]


def write_comparison(runs: list[Path], annotations: Path, folder: Path, *, seed: int = 0) -> tuple[dict[str, Any], list[Path]]:
    """Compare the runs' grounding with the first's (:func:`xclip.analysis.comparison.compare_runs`) and write
    comparison.json and the difference charts into ``folder``: the report, and the paths written."""
    report = compare_runs(runs, annotations, seed=seed)
    write_text_atomically(folder / "comparison.json", json.dumps(report, indent=2) + "\n")
    return report, [folder / "comparison.json", *difference_charts(report, folder)]
