"""``xclip evaluate``: grounding metrics of a run against phrase annotations with boxes.

Annotations are JSON lines, one per image-caption pair::

    {"image": "scene00001.png", "caption": "a red circle and a blue star",
     "phrases": [{"text": "red circle", "start": 2, "end": 12, "boxes": [[x0, y0, x1, y1]], "class": "circle"}]}

``image`` is the path relative to the run's ``data.root``, ``start``/``end`` a character span of the caption and
boxes are in original-image pixels. Each phrase is scored in both directions: phrase -> image (its tokens'
summed map over the patches, against its boxes) and box -> phrase (the tokens' interactions with the boxes,
against the phrase's tokens). A patch belongs to the boxes by the share of its area they cover
(:mod:`xclip.geometry`), so a box smaller than a patch scores what it covers.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xclip.errors import ConfigError
from xclip.geometry import Preprocessing
from xclip.metrics import bootstrap_ci, energy_in_box, mass_ratio, pointing_game
from xclip.schema import CAPTION_INDEX, IMAGE_INDEX, PAIRS
from xclip.store import DONE, RunReader, run_file_path
from xclip.textfiles import text_lines

METRICS = ("pointing_game", "energy_in_box", "mass_ratio")
DIRECTIONS = ("phrase_to_image", "box_to_phrase")


@dataclass(frozen=True)
class PhraseScore:
    pair: int
    phrase: str
    label: str
    values: dict[str, float]  # "<direction>/<metric>" -> score


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    """Annotation records; raises :class:`ConfigError` naming the line and the problem of a malformed one."""
    path = Path(path)
    if not path.is_file():
        msg = f"annotations file {path} does not exist"
        raise ConfigError(msg)
    records = []
    for number, line, problem in text_lines(path, "annotations file"):
        where = f"{path}:{number}"
        if line is None:
            raise ConfigError(f"{where}: {problem}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"{where}: invalid JSON: {e.msg} (column {e.colno})"
            raise ConfigError(msg) from None
        problem = _annotation_problem(record)
        if problem:
            msg = f"{where}: {problem}"
            raise ConfigError(msg)
        records.append(record)
    return records


def _annotation_problem(record: object) -> str | None:
    """Why a record is not ``{"image", "caption", "phrases": [{"text", "start", "end", "boxes"}]}``, or None."""
    shape = "an annotation record is an object with image, caption and phrases[text, start, end, boxes]"
    if not isinstance(record, dict) or not all(key in record for key in ("image", "caption", "phrases")):
        return shape
    if not isinstance(record["image"], str) or not isinstance(record["caption"], str) or not isinstance(record["phrases"], list):
        return f"{shape}: image and caption are strings, phrases a list"
    for phrase in record["phrases"]:
        if not isinstance(phrase, dict) or not all(key in phrase for key in ("text", "start", "end", "boxes")):
            return f"{shape}: a phrase lacks text, start, end or boxes"
        start, end = phrase["start"], phrase["end"]
        if not (isinstance(start, int) and isinstance(end, int)) or record["caption"][start:end] != phrase["text"]:
            return f"span {start!r}:{end!r} of the caption is not {phrase['text']!r}"
        if not phrase["boxes"] or not isinstance(phrase["boxes"], list):
            return f"phrase {phrase['text']!r} has no box"
        for box in phrase["boxes"]:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                return f"phrase {phrase['text']!r}: a box is four finite numbers x0, y0, x1, y1, got {box!r}"
            if box[2] <= box[0] or box[3] <= box[1]:
                return f"phrase {phrase['text']!r}: box {box} needs x0 < x1 and y0 < y1"
    return None


def box_weights(boxes: list[list[float]], geometry: Preprocessing) -> np.ndarray:
    """``(rows * columns,)``: the share of each patch's area inside a phrase's boxes (the shares of several
    boxes add up, capped at the whole patch)."""
    return np.clip(sum(geometry.box_coverage(tuple(box)) for box in boxes), 0.0, 1.0)


def score_run(run_dir: str | Path, annotations_path: str | Path) -> list[PhraseScore]:
    """Score every annotated phrase of the run's finished pairs, from what the run file stores (the tokens'
    character spans, the images' geometry): no model or tokenizer is loaded."""
    annotations = {(r["image"], r["caption"]): r for r in read_annotations(annotations_path)}
    scores: list[PhraseScore] = []
    with RunReader(run_dir) as run:
        texts, paths = run.captions(), run.image_paths()
        caption_index, image_index = run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX)
        for index in np.flatnonzero(run.status(PAIRS) == DONE):
            c, i = int(caption_index[index]), int(image_index[index])
            record = annotations.get((paths[i], texts[c]))
            if record is None:
                continue
            patch_values = run.interactions(int(index)).astype(np.float64)[:, run.n_prefix :]
            tokens = run.caption_tokens(c)
            geometry = run.preprocessing(i)
            content = ~np.array(tokens.special)  # special tokens are no phrase
            for phrase in record["phrases"]:
                rows = tokens.rows_overlapping(phrase["start"], phrase["end"])
                if not rows:
                    continue
                try:
                    inside_image = box_weights(phrase["boxes"], geometry)
                except ConfigError as e:
                    msg = f"pair {int(index)} ({paths[i]}), phrase {phrase['text']!r}: {e}"
                    raise ConfigError(msg) from None
                phrase_map = patch_values[rows].sum(0)
                inside_tokens = np.zeros(len(tokens), dtype=bool)
                inside_tokens[rows] = True
                token_scores = (patch_values @ inside_image)[content]
                values = {}
                for direction, (v, inside) in {
                    "phrase_to_image": (phrase_map, inside_image),
                    "box_to_phrase": (token_scores, inside_tokens[content]),
                }.items():
                    values[f"{direction}/pointing_game"] = pointing_game(v, inside)
                    values[f"{direction}/energy_in_box"] = energy_in_box(v, inside)
                    values[f"{direction}/mass_ratio"] = mass_ratio(v, inside)
                scores.append(PhraseScore(int(index), phrase["text"], str(phrase.get("class", "all")), values))
    if not scores:
        msg = f"no finished pair of {run_file_path(run_dir)} matches an annotation (same image path and caption) in {annotations_path}"
        raise ConfigError(msg)
    return scores


def summarize(scores: list[PhraseScore], *, seed: int = 0) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals, overall and per class."""
    groups: dict[str, list[PhraseScore]] = defaultdict(list)
    for score in scores:
        groups[score.label].append(score)

    def stats(items: list[PhraseScore]) -> dict[str, Any]:
        out: dict[str, Any] = {"n_phrases": len(items)}
        for key in items[0].values:
            samples = np.array([s.values[key] for s in items])
            low, high = bootstrap_ci(samples, seed=seed)
            out[key] = {"mean": float(samples.mean()), "ci95": [low, high]}
        return out

    return {"overall": stats(scores), "per_class": {label: stats(items) for label, items in sorted(groups.items())}}


def bar_chart(report: dict[str, Any], path: Path, metric: str = "phrase_to_image/pointing_game") -> Path:
    """A bar per class of one metric, with its 95 % interval; the overall mean as a line."""
    from matplotlib.figure import Figure

    labels = list(report["per_class"])
    means = [report["per_class"][k][metric]["mean"] for k in labels]
    low = [m - report["per_class"][k][metric]["ci95"][0] for m, k in zip(means, labels)]
    high = [report["per_class"][k][metric]["ci95"][1] - m for m, k in zip(means, labels)]
    fig = Figure(figsize=(max(4.0, 0.8 * len(labels) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(labels, means, yerr=[low, high], capsize=4, color="#b2182b")
    ax.axhline(report["overall"][metric]["mean"], color="black", linestyle="--", linewidth=1, label="overall")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric.replace("/", ": ").replace("_", " "))
    ax.tick_params(axis="x", rotation=30)
    ax.legend(loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
