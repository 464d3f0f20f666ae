"""``xclip evaluate``: grounding metrics of a run against phrase annotations with boxes.

Annotations are JSON lines, one per image-caption pair::

    {"image": "scene00001.png", "caption": "a red circle and a blue star",
     "phrases": [{"text": "red circle", "start": 2, "end": 12, "boxes": [[x0, y0, x1, y1]], "class": "circle"}]}

``image`` is the path relative to the run's ``data.root``, ``start``/``end`` a character span of the caption and
boxes are in original-image pixels. Each phrase is scored in both directions: phrase -> image (its tokens'
summed map over the patches, against its boxes) and box -> phrase (the tokens' interactions with the boxes,
against the phrase's tokens). A patch belongs to the boxes by the share of its area they cover
(:mod:`xclip.core.geometry`), so a box smaller than a patch scores what it covers.
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
from xclip.disk.files import write_text_atomically
from xclip.core.geometry import Preprocessing
from xclip.analysis.box_metrics import energy_in_box, mass_ratio, pointing_game
from xclip.analysis.summaries import count_text, interval_bars, interval_figure, mean_interval, save_chart
from xclip.store.schema import CAPTION_INDEX, DONE, IMAGE_INDEX, PAIRS
from xclip.store.layout import run_file_path
from xclip.store.reader import RunReader
from xclip.disk.textfiles import text_lines
from xclip.show.links import view_link

METRICS = ("pointing_game", "energy_in_box", "mass_ratio")
DIRECTIONS = ("phrase_to_image", "box_to_phrase")


@dataclass(frozen=True)
class PhraseScore:
    pair: int
    phrase: str
    label: str
    values: dict[str, float]  # "<direction>/<metric>" -> score
    chance: dict[str, float]  # "<direction>/<metric>" -> what a map that knows nothing of the phrase scores
    image: str = ""  # the pair's image, as the run names it
    link: str = ""  # the viewer's address of the pair with the phrase and its first box (see xclip.show.viewer.view_link)
    n_phrases: int = 1  # grounded phrases of the caption: the objects it names
    shares_class: bool = False  # another phrase of the caption has the same class
    caption: str = ""
    span: tuple[int, int] = (0, 0)  # the phrase's characters in the caption
    line: int = 0  # the annotation's line in its file
    boxes: tuple[tuple[float, ...], ...] = ()  # the boxes it was scored against (those the model saw a part of)

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What the phrase is wherever it was scored: its image, caption and span (runs number pairs their way)."""
        return (self.image, self.caption, *self.span)


@dataclass(frozen=True)
class Miss:
    """A phrase whose map's largest value lies outside its boxes (phrase -> image pointing game 0)."""

    pair: int
    phrase: str
    label: str
    image: str
    energy_in_box: float  # the share of its positive mass inside the boxes: the lower, the worse the miss
    link: str


@dataclass(frozen=True)
class UnmatchedPhrase:
    """An annotated phrase that was not scored, and why: its image is not in the run, the run pairs no such
    caption with it, the pair is not finished, or the model read none of its words."""

    line: int  # of the annotations file
    image: str
    caption: str
    phrase: str
    reason: str


@dataclass(frozen=True)
class SkippedBox:
    """A box that lies wholly outside the part of the image the model saw: its phrase is scored against its
    other boxes, or not at all when it has none left."""

    line: int
    image: str
    phrase: str
    box: tuple[float, ...]
    reason: str


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_annotations` scored, and every annotation it could not score, with the reason."""

    scores: list[PhraseScore]
    unmatched_phrases: list[UnmatchedPhrase]
    skipped_boxes: list[SkippedBox]
    n_clipped_boxes: int  # boxes partly outside what the model saw: scored by the part it saw


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    """Annotation records; raises :class:`ConfigError` naming the line and the problem of a malformed one."""
    return [record for _, record in read_numbered_annotations(path)]


def read_numbered_annotations(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every annotation; raises :class:`ConfigError` naming the line and the problem
    of a malformed one."""
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
        records.append((number, record))
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


@dataclass(frozen=True)
class AnnotatedPair:
    """A finished pair of a run and its annotation record (``phrases`` empty when none was asked for)."""

    index: int
    caption_index: int
    image_index: int
    caption: str
    image: str  # as the run names it
    phrases: list[dict[str, Any]]
    line: int = 0  # the annotation's line in its file (0: no annotation)


NO_IMAGE = "no such image in the run"
NO_CAPTION = "no such caption for that image in the run"
NOT_FINISHED = "pair not finished"


def annotated_pairs(run: RunReader, annotations_path: str | Path | None) -> list[AnnotatedPair]:
    """The run's finished pairs that an annotation names (same image path and caption), in pair order; every
    finished pair, with no phrases, when ``annotations_path`` is None."""
    return match_annotations(run, annotations_path)[0]


def match_annotations(run: RunReader, annotations_path: str | Path | None) -> tuple[list[AnnotatedPair], list[UnmatchedPhrase]]:
    """:func:`annotated_pairs`, and each phrase of the annotations that match no finished pair, with the reason
    (:data:`NO_IMAGE`, :data:`NO_CAPTION`, :data:`NOT_FINISHED`, or a later line's annotation of the same pair)."""
    texts, paths = run.captions(), run.image_paths()
    caption_index, image_index = run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX)
    status = run.status(PAIRS)
    if not annotations_path:
        return [AnnotatedPair(int(k), int(caption_index[k]), int(image_index[k]), texts[int(caption_index[k])],
                              paths[int(image_index[k])], []) for k in np.flatnonzero(status == DONE)], []
    pair_of = {(paths[int(i)], texts[int(c)]): k for k, (c, i) in enumerate(zip(caption_index, image_index))}
    images = set(paths)
    chosen: dict[int, tuple[int, dict[str, Any]]] = {}
    unmatched: list[UnmatchedPhrase] = []

    def drop(line: int, record: dict[str, Any], reason: str) -> None:
        unmatched.extend(UnmatchedPhrase(line, record["image"], record["caption"], p["text"], reason) for p in record["phrases"])

    for line, record in read_numbered_annotations(annotations_path):
        index = pair_of.get((record["image"], record["caption"]))
        if index is None:
            drop(line, record, NO_IMAGE if record["image"] not in images else NO_CAPTION)
        elif status[index] != DONE:
            drop(line, record, NOT_FINISHED)
        else:
            if index in chosen:  # the later line of a pair replaces the earlier one, as a dict would, but says so
                earlier, old = chosen[index]
                drop(earlier, old, f"the same pair is annotated again on line {line}, which is used")
            chosen[index] = (line, record)
    found = [AnnotatedPair(index, int(caption_index[index]), int(image_index[index]), texts[int(caption_index[index])],
                           paths[int(image_index[index])], record["phrases"], line)
             for index, (line, record) in sorted(chosen.items())]
    return found, sorted(unmatched, key=lambda u: u.line)


def grounding_scores(values: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` of one map against one region."""
    return {"pointing_game": pointing_game(values, inside), "energy_in_box": energy_in_box(values, inside),
            "mass_ratio": mass_ratio(values, inside)}


def score_run(run_dir: str | Path, annotations_path: str | Path) -> list[PhraseScore]:
    """Score every annotated phrase of the run's finished pairs (see :func:`evaluate_annotations`)."""
    return evaluate_annotations(run_dir, annotations_path).scores


def evaluate_annotations(run_dir: str | Path, annotations_path: str | Path) -> Evaluation:
    """Score every annotated phrase of the run's finished pairs, from what the run file stores (the tokens'
    character spans, the images' geometry): no model or tokenizer is loaded. Phrases that match no finished
    pair, and boxes wholly outside what the model saw, are left out and listed; one bad annotation never
    stops the others.

    Raises:
        ConfigError: no phrase could be scored (naming how many annotations matched nothing).
    """
    scores: list[PhraseScore] = []
    skipped: list[SkippedBox] = []
    n_clipped = 0
    with RunReader(run_dir) as run:
        run.require_contributions("scoring phrases against their boxes (xclip evaluate --annotations, xclip compare)")
        pairs, unmatched = match_annotations(run, annotations_path)
        for pair in pairs:
            index = pair.index
            patch_values = run.interactions(index).astype(np.float64)[:, run.n_prefix :]
            tokens = run.caption_tokens(pair.caption_index)
            geometry = run.preprocessing(pair.image_index)
            content = ~np.array(tokens.special)  # special tokens are no phrase
            labels = [phrase_class(p) for p in pair.phrases]
            for phrase, label in zip(pair.phrases, labels):
                rows = tokens.rows_overlapping(phrase["start"], phrase["end"])
                if not rows:
                    unmatched.append(UnmatchedPhrase(pair.line, pair.image, pair.caption, phrase["text"],
                                                     "the model read none of its words (the caption was truncated before it)"))
                    continue
                boxes = boxes_in_view(phrase["boxes"], geometry)
                skipped += [SkippedBox(pair.line, pair.image, phrase["text"], tuple(box), _outside_reason(geometry))
                            for box in boxes.outside]
                n_clipped += boxes.n_clipped
                seen = boxes.seen
                if not seen:
                    continue
                values, chance = _both_directions(patch_values, rows, box_weights(seen, geometry), content)
                link = view_link(index, tokens, geometry, span=(phrase["start"], phrase["end"]), box=tuple(seen[0]))
                scores.append(PhraseScore(index, phrase["text"], label, values, chance, image=pair.image, link=link,
                                          n_phrases=len(labels), shares_class=labels.count(label) > 1,
                                          caption=pair.caption, span=(int(phrase["start"]), int(phrase["end"])),
                                          line=pair.line, boxes=tuple(tuple(float(v) for v in box) for box in seen)))
    if not scores:
        first = "; ".join(left_out_lines(unmatched, skipped, 3))
        msg = (f"no phrase of {annotations_path} could be scored on {run_file_path(run_dir)}: {len(unmatched)} phrase(s) "
               f"match no finished pair (same image path and caption) or no word the model read, {len(skipped)} box(es) "
               f"lie wholly outside what the model saw" + (f" (first: {first})" if first else ""))
        raise ConfigError(msg)
    return Evaluation(scores, sorted(unmatched, key=lambda u: u.line), skipped, n_clipped)


def _both_directions(patch_values: np.ndarray, rows: list[int], inside_image: np.ndarray,
                     content: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Every metric of both :data:`DIRECTIONS` of one phrase, and their chance levels (``"<direction>/<metric>"``):
    phrase -> image scores the phrase's rows' summed map ``(patches,)`` against the boxes' patch weights
    ``inside_image``, box -> phrase the caption's ``content`` tokens' interactions with the boxes against the
    phrase's ``rows``."""
    inside_tokens = np.zeros(len(content), dtype=bool)
    inside_tokens[rows] = True
    regions = {"phrase_to_image": (patch_values[rows].sum(0), inside_image),
               "box_to_phrase": ((patch_values @ inside_image)[content], inside_tokens[content])}
    values, chance = {}, {}
    for direction, (v, inside) in regions.items():
        values.update({f"{direction}/{name}": score for name, score in grounding_scores(v, inside).items()})
        chance.update({f"{direction}/{name}": level for name, level in chance_levels(inside).items()})
    return values, chance


@dataclass(frozen=True)
class BoxesInView:
    """A phrase's boxes by how much of them the model saw: a box wholly outside the crop is no region of its map
    (a phrase is scored on the rest, and not at all when none is left)."""

    seen: list[list[float]]  # at least part of it
    outside: list[list[float]]  # none of it
    n_clipped: int  # boxes of ``seen`` partly outside: scored by the part the model saw


def boxes_in_view(boxes: list[list[float]], geometry: Preprocessing) -> BoxesInView:
    """Split ``boxes`` by the share of each inside the part of the image the model saw."""
    shares = [geometry.crop_share(tuple(box)) for box in boxes]
    return BoxesInView(seen=[box for box, share in zip(boxes, shares) if share > 0.0],
                       outside=[box for box, share in zip(boxes, shares) if not share > 0.0],
                       n_clipped=sum(0.0 < share < 1.0 for share in shares))


def phrase_class(phrase: dict[str, Any]) -> str:
    """The class an annotation gives a phrase, ``all`` where it gives none: per-class summaries group phrases by it."""
    return str(phrase.get("class", "all"))


def left_out_lines(unmatched: list[UnmatchedPhrase], skipped: list[SkippedBox], limit: int | None) -> list[str]:
    """``line N: phrase 'x' of 'caption' on image: reason`` of the unmatched phrases, then the skipped boxes,
    ``limit`` of each."""
    lines = [f"line {u.line}: phrase {u.phrase!r} of {u.caption!r} on {u.image}: {u.reason}" for u in unmatched[:limit]]
    lines += [f"line {b.line}: phrase {b.phrase!r}: box {','.join(f'{v:g}' for v in b.box)} on {b.image} lies {b.reason}"
              for b in skipped[:limit]]
    return lines


def _outside_reason(geometry: Preprocessing) -> str:
    x0, y0, x1, y1 = geometry.crop_box
    width, height = geometry.original_size
    return (f"wholly outside the part of the image the model saw (x {x0:.4g}..{x1:.4g}, y {y0:.4g}..{y1:.4g} of the "
            f"{width} x {height} image; the preprocessing cropped the rest)")


def phrase_rows(scores: list[PhraseScore]) -> list[dict[str, Any]]:
    """One record per scored phrase, for ``phrases.jsonl``: where it is (pair, annotation line, image, caption,
    span), what it is (phrase, class, boxes) and each metric's value and chance level."""
    return [{"pair": s.pair, "line": s.line, "image": s.image, "caption": s.caption, "phrase": s.phrase,
             "start": s.span[0], "end": s.span[1], "class": s.label, "boxes": [list(box) for box in s.boxes],
             **s.values, "chance": s.chance} for s in scores]


def misses(scores: list[PhraseScore]) -> list[Miss]:
    """The phrases whose map points outside their boxes, worst first (least of their positive mass inside)."""
    missed = [s for s in scores if s.values["phrase_to_image/pointing_game"] == 0.0]
    return [Miss(s.pair, s.phrase, s.label, s.image, s.values["phrase_to_image/energy_in_box"], s.link)
            for s in sorted(missed, key=lambda s: (s.values["phrase_to_image/energy_in_box"], s.pair))]


def failure_patterns(scores: list[PhraseScore], *, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The phrase -> image pointing game (mean and 95 % interval) of groups of phrases, for what the run can
    tell apart: the object's size (the share of the image's patches its boxes cover, in thirds of the phrases),
    the number of objects the caption names, and whether the caption names another object of the same class."""
    game = "phrase_to_image/pointing_game"
    size = np.array([s.chance["phrase_to_image/energy_in_box"] for s in scores])
    low, high = np.quantile(size, [1 / 3, 2 / 3])
    by_size = {
        f"small (under {low:.1%} of the image)": size < low,
        f"medium ({low:.1%} to {high:.1%})": (size >= low) & (size < high),
        f"large ({high:.1%} or more)": size >= high,
    }
    named = np.array([s.n_phrases for s in scores])
    by_count = {f"{n} object{'s' * (n > 1)} named": named == n for n in range(1, 4)}
    by_count["4 or more objects named"] = named >= 4
    same = np.array([s.shares_class for s in scores])
    by_class = {"no other object of its class named": ~same, "another object of its class named": same}
    values = np.array([s.values[game] for s in scores])

    def rows(groups: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        out = []
        for name, members in groups.items():
            if members.any():
                summary = mean_interval(values[members], seed=seed)
                out.append({"group": name, "n_phrases": summary.n, "pointing_game": summary.mean, "ci95": summary.ci95})
        return out

    return {"object_size": rows(by_size), "objects_named": rows(by_count), "same_class_named": rows(by_class)}


def write_misses(scores: list[PhraseScore], path: Path, *, seed: int = 0) -> dict[str, Any]:
    """Every miss (worst first, see :func:`misses`) and the :func:`failure_patterns`, as ``path`` (JSON)."""
    found = {"misses": [vars(miss) for miss in misses(scores)], "patterns": failure_patterns(scores, seed=seed)}
    write_text_atomically(path, json.dumps(found, indent=2) + "\n")
    return found


def chance_levels(inside: np.ndarray) -> dict[str, float]:
    """What each metric scores, on average, for a map that knows nothing of the region ``inside`` (weights or
    booleans): the pointing game's largest value falls on a random position (the share of positions the region
    touches), energy in box of an even positive map is the region's share by weight, and mass ratio of a map
    of random signs is 0.5."""
    weights = np.asarray(inside, dtype=np.float64)
    return {"pointing_game": float((weights > 0).mean()), "energy_in_box": float(weights.mean()), "mass_ratio": 0.5}


def summarize(scores: list[PhraseScore], *, seed: int = 0) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals and the mean chance level, overall and per class."""
    groups: dict[str, list[PhraseScore]] = defaultdict(list)
    for score in scores:
        groups[score.label].append(score)

    def stats(items: list[PhraseScore]) -> dict[str, Any]:
        out: dict[str, Any] = {"n_phrases": len(items)}
        for key in items[0].values:
            summary = mean_interval(np.array([s.values[key] for s in items]), seed=seed)
            out[key] = {**summary.record(), "chance": float(np.mean([s.chance[key] for s in items]))}
        return out

    return {"overall": stats(scores), "per_class": {label: stats(items) for label, items in sorted(groups.items())}}


def bar_charts(report: dict[str, Any], folder: Path) -> list[Path]:
    """A bar chart of every direction and metric in ``folder``: ``phrase_to_image_pointing_game.png``, ..."""
    return [bar_chart(report, folder / f"{d}_{m}.png", f"{d}/{m}") for d in DIRECTIONS for m in METRICS]


def bar_chart(report: dict[str, Any], path: Path, metric: str) -> Path:
    """A bar per class of one metric, with its 95 % interval and its chance level; the overall mean as a line."""
    return save_chart(_chart(report, metric), path)


def _chart(report: dict[str, Any], metric: str) -> Any:
    """The matplotlib figure of :func:`bar_chart`. Each class's chance level (what a map that knows nothing of
    the phrase scores: see :func:`chance_levels`) is a dotted dash across its bar, since it depends on the
    boxes' sizes; the legend sits above the axes, where it hides no bar or whisker."""
    labels = list(report["per_class"])
    stats = [report["per_class"][k][metric] for k in labels]
    positions = np.arange(len(labels))
    figure, axes = interval_figure(len(labels), 0.8)
    interval_bars(axes, positions, stats, capsize=4, color="#b2182b", label="mean, 95 % interval")
    axes.hlines([s["chance"] for s in stats], positions - 0.45, positions + 0.45, colors="#2166ac", linestyles=":",
                linewidth=2, label="chance")
    axes.axhline(report["overall"][metric]["mean"], color="black", linestyle="--", linewidth=1, label="overall mean")
    ticks = [f"{label}\n{count_text(s['n'])}" for label, s in zip(labels, stats)]
    axes.set_xticks(positions, ticks, rotation=30, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel(metric.replace("/", ": ").replace("_", " "))
    figure.legend(loc="outside upper center", ncols=3, frameon=False, fontsize="small")
    return figure
