"""``xclip compare``: the grounding metrics of runs over the same pairs, side by side, with paired differences.

Runs of two checkpoints (or two references, layers, resize modes) over the same image-caption pairs are scored
against the same annotations (:func:`xclip.analysis.grounding.score_run`). Each phrase is then scored once per run, so the
difference of a metric between runs is taken phrase by phrase, and its 95 % interval comes from resampling phrases
(a paired bootstrap): far narrower than comparing two intervals, and zero exactly for two runs that agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xclip.errors import ConfigError
from xclip.analysis.grounding import DIRECTIONS, METRICS, PhraseScore, score_run
from xclip.analysis.summaries import count_text, interval_bars, interval_figure, mean_interval, paired_difference, save_chart
from xclip.config import settings_differences
from xclip.store.layout import run_file_path
from xclip.store.reader import RunReader

RUN_NAMES = "ABCDEFGH"


def compare_runs(runs: list[Path], annotations: Path, *, seed: int = 0) -> dict[str, Any]:
    """Score every run against ``annotations`` and compare them with the first.

    Returns:
        ``{"runs": {letter: run file}, "n_phrases": n, "overall": ..., "per_class": {class: ...}}``, where each
        entry holds, per ``direction/metric``, every run's mean and 95 % interval and each later run's paired
        difference from the first (``"B-A"``: mean and 95 % interval).

    Raises:
        ConfigError: fewer than two runs, more than :data:`RUN_NAMES` has letters, or runs that do not score the
            same phrases (naming how many differ and one of them).
    """
    if not 2 <= len(runs) <= len(RUN_NAMES):
        msg = f"compare needs 2 to {len(RUN_NAMES)} runs, got {len(runs)}"
        raise ConfigError(msg)
    scored = [{score.key: score for score in score_run(run, annotations)} for run in runs]
    first = scored[0]
    for run, phrases in zip(runs[1:], scored[1:]):
        _check_same_phrases(runs[0], first, run, phrases)
    keys = list(first)  # the first run's order
    columns = {f"{d}/{m}": np.array([[run[key].values[f"{d}/{m}"] for key in keys] for run in scored])
               for d in DIRECTIONS for m in METRICS}
    labels = np.array([first[key].label for key in keys])
    groups = {label: labels == label for label in sorted(set(labels))}
    names = RUN_NAMES[: len(runs)]
    identities = [_run_identity(run) for run in runs]
    return {
        "runs": {name: str(run_file_path(run)) for name, run in zip(names, runs)},
        "settings_differences": {f"{name}-{names[0]}": _differences(identities[0], identity)
                                 for name, identity in zip(names[1:], identities[1:])},
        "n_phrases": len(keys),
        "overall": _stats(columns, np.ones(len(keys), dtype=bool), names, seed),
        "per_class": {label: _stats(columns, members, names, seed) for label, members in groups.items()},
    }


def _stats(columns: dict[str, np.ndarray], members: np.ndarray, names: str, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n_phrases": int(members.sum())}
    for metric, values in columns.items():
        chosen = values[:, members]
        entry: dict[str, Any] = {}
        for name, row in zip(names, chosen):
            entry[name] = mean_interval(row, seed=seed).record()
        for name, row in zip(names[1:], chosen[1:]):
            entry[f"{name}-{names[0]}"] = paired_difference(row, chosen[0], seed=seed).record()
        out[metric] = entry
    return out


def _run_identity(run: Path) -> tuple[str, str]:
    """A run's stored settings that change its maps (its result fingerprint: model, dtype, layers, references,
    tolerance...) and its weights' digest."""
    with RunReader(run) as reader:
        return str(reader.attrs["fingerprint"]), str(reader.attrs.get("model_weights_sha256", ""))


def _differences(first: tuple[str, str], later: tuple[str, str]) -> list[str]:
    """``setting: first -> later`` of every stored setting the runs disagree on, and their weights if they differ."""
    differences = settings_differences(first[0], later[0])
    if first[1] != later[1]:
        differences.append(f"model weights sha256: {first[1][:12] or '-'} -> {later[1][:12] or '-'}")
    return differences


def _check_same_phrases(run_a: Path, a: dict[tuple, PhraseScore], run_b: Path, b: dict[tuple, PhraseScore]) -> None:
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    if not only_a and not only_b:
        return
    parts = []
    for run, other, missing in ((run_a, run_b, only_a), (run_b, run_a, only_b)):
        if missing:
            image, caption, start, end = missing[0]
            parts.append(f"{len(missing)} annotated phrase(s) scored in {run} have no finished pair in {other} "
                         f"(first: {caption[start:end]!r} of {caption!r} on {image})")
    msg = ("the runs do not score the same phrases, so their maps cannot be compared phrase by phrase: "
           + "; ".join(parts) + ". Compare runs over the same pairs (finish both; use the same data and pairing)")
    raise ConfigError(msg)


def difference_charts(report: dict[str, Any], folder: Path) -> list[Path]:
    """One chart per direction and metric in ``folder``: each class's paired difference of every later run from
    the first, with its 95 % interval, around a zero line (``difference_phrase_to_image_pointing_game.png``...)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(report["runs"])
    differences = [f"{name}-{names[0]}" for name in names[1:]]
    labels = ["overall", *report["per_class"]]
    paths = []
    for direction in DIRECTIONS:
        for metric in METRICS:
            key = f"{direction}/{metric}"
            figure, axes = interval_figure(len(labels), 0.9)
            width = 0.8 / len(differences)
            for k, difference in enumerate(differences):
                stats = [(report["overall"] if label == "overall" else report["per_class"][label])[key][difference] for label in labels]
                positions = np.arange(len(labels)) + (k - (len(differences) - 1) / 2) * width
                later, first = (Path(report["runs"][name]).parent.name for name in difference.split("-"))
                label = f"{difference.replace('-', ' − ')} ({later} − {first}), 95 % interval"
                interval_bars(axes, positions, stats, width=width, capsize=3, label=label)
            axes.axhline(0, color="black", linewidth=1)
            counts = [(report["overall"] if label == "overall" else report["per_class"][label])["n_phrases"] for label in labels]
            ticks = [f"{label}\n{count_text(n)}" for label, n in zip(labels, counts)]
            axes.set_xticks(np.arange(len(labels)), ticks, rotation=30, ha="right")
            axes.set_ylabel(f"difference in {key.replace('/', ': ').replace('_', ' ')}")
            figure.legend(loc="outside upper center", ncols=min(3, len(differences)), frameon=False, fontsize="small")
            paths.append(save_chart(figure, folder / f"difference_{direction}_{metric}.png"))
    return paths
