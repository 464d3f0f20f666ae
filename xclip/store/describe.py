"""What a run file holds, as a plain dict (printed by ``xclip inspect``, or as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xclip.store.schema import (
    MAP_ERROR_BOUND,
    N_ENDPOINTS,
    CAPTION_INDEX,
    CAPTIONS,
    COMPLETENESS_BOUND,
    COMPLETENESS_ERROR,
    GROUPS,
    IMAGE_INDEX,
    IMAGES,
    IS_CONVERGED,
    IS_TRUNCATED,
    N_NODES,
    NOTES,
    PAIR_TABLE_NUMBERS,
    PAIRS,
    PREPROCESSING,
    RELATIVE_COMPLETENESS_ERROR,
    TERMS,
    UNKNOWN,
    Status,
)
from xclip.core.geometry import seen_shares
from xclip.attribution.inputs_read import CaptionRead, ImageRead, caption_read, image_read
from xclip.attribution.result import INEXACT_PAIR_FACTOR, is_inexact_pair
from xclip.store.reader import RunReader

DONE, FAILED = Status.DONE, Status.FAILED


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    with RunReader(run_dir) as run:
        counts = {}
        for group in GROUPS:
            status = run.status(group)
            counts[group] = {"total": int(status.size), **{code.label: int((status == code).sum()) for code in Status}}
        rejected = run.rejected_records()
        captions, images = run.captions(), run.image_paths()
        status = run.status(PAIRS)
        numbers = run.finished_columns(PAIRS, PAIR_TABLE_NUMBERS, status)  # NaN for unfinished pairs: not results
        terms = run.column(PAIRS, TERMS)
        rows = []
        for i, (c, m) in enumerate(zip(run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX))):
            is_done = status[i] == DONE
            row = {"index": i, "caption_index": int(c), "image_index": int(m), "caption": captions[c], "image": images[m],
                   "status": Status(int(status[i])).label, "terms": [float(t) for t in terms[i]] if is_done else None}
            row.update({name: float(values[i]) if np.isfinite(values[i]) else None for name, values in numbers.items()})
            rows.append(row)
        return {
            "file": str(run.path),
            "model": run.attrs["model_name"],
            "created": run.attrs["created"],
            "xclip_version": run.attrs["xclip_version"],
            "config": run.config,
            "stores_contributions": run.stores_contributions,
            "counts": counts,
            "rejected_records": rejected,
            "accuracy": describe_accuracy(run),
            "failures": describe_failures(run, GROUPS),
            **describe_inputs_read(run),
            "pairs": rows,
        }


def inputs_read_of_pair(run: RunReader, pair: int) -> tuple[CaptionRead, ImageRead]:
    """What the model read of a pair's caption and saw of its image (its own rows only)."""
    caption, image = run.pair_inputs(pair)
    is_truncated = bool(run.value(CAPTIONS, IS_TRUNCATED, caption))
    notes = run.value(IMAGES, NOTES, image)
    return (caption_read(run.caption_tokens(caption), is_truncated=is_truncated),
            image_read(run.preprocessing(image), resize=run.settings.image.resize,
                       notes=notes.decode() if isinstance(notes, bytes) else str(notes)))


# truncated captions are listed up to this many (each a read of its tokens)
MAX_TRUNCATED_CAPTIONS_LISTED = 10_000


def describe_inputs_read(run: RunReader) -> dict[str, Any]:
    """What the model read of a run's finished inputs, where it is less than given (see :mod:`xclip.attribution.inputs_read`):
    truncated captions, unknown words, and images a crop cut more than the run's ``image.crop_warning`` of."""
    return {
        "truncated_captions": describe_truncated_captions(run),
        "unknown_words": describe_unknown_words(run),
        "cropped_images": describe_crops(run, float(run.config["image"]["crop_warning"])),
    }


def inputs_read_report(run_dir: str | Path) -> dict[str, Any]:
    """:func:`describe_inputs_read` of the run in ``run_dir`` (a run directory or its ``run.h5``): the block a
    report of the run (``evaluate``'s ``report.json``) carries as ``inputs_read``."""
    with RunReader(run_dir) as run:
        return describe_inputs_read(run)


def describe_truncated_captions(run: RunReader) -> list[dict[str, Any]]:
    """Finished captions longer than the model's context, each with the tokens and words it read and the rest
    (the first :data:`MAX_TRUNCATED_CAPTIONS_LISTED`; ``xclip inspect`` counts them all)."""
    truncated = np.flatnonzero(run.column(CAPTIONS, IS_TRUNCATED) & (run.status(CAPTIONS) == DONE))
    rows = []
    for caption in truncated[:MAX_TRUNCATED_CAPTIONS_LISTED]:
        read = caption_read(run.caption_tokens(int(caption)), is_truncated=True)
        rows.append({"index": int(caption), "caption": read.caption, "n_tokens_read": read.n_tokens_read,
                     "n_words_read": read.n_words_read, "n_words": read.n_words, "unread": read.unread_text})
    return rows


# unknown words are looked up in at most this many captions (each a read of its tokens); the rest are counted
MAX_CAPTIONS_SEARCHED_FOR_UNKNOWN_WORDS = 10_000


def describe_unknown_words(run: RunReader) -> dict[str, Any]:
    """Finished captions holding tokens unknown to the tokenizer: how many, and each unknown word (as the
    caption wrote it) with the number of captions it is in, most frequent first."""
    finished = run.status(CAPTIONS) == DONE
    affected = np.flatnonzero(run.column(CAPTIONS, UNKNOWN).any(axis=1) & finished)
    counts: dict[str, int] = {}
    for caption in affected[:MAX_CAPTIONS_SEARCHED_FOR_UNKNOWN_WORDS]:
        for word in run.caption_tokens(int(caption)).unknown_words():
            counts[word] = counts.get(word, 0) + 1
    words = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return {"captions": int(affected.size), "searched": int(min(affected.size, MAX_CAPTIONS_SEARCHED_FOR_UNKNOWN_WORDS)), "words": words}


def describe_crops(run: RunReader, warn_above: float) -> dict[str, Any]:
    """Finished images whose preprocessing cut away more than ``warn_above`` of their area: how many, and each
    image's path with the share the model saw, least seen first."""
    finished = np.flatnonzero(run.status(IMAGES) == DONE)
    rows = run.column(IMAGES, PREPROCESSING)[finished]
    seen = seen_shares(rows)
    cut = np.argsort(seen, kind="stable")
    cut = cut[seen[cut] < 1.0 - warn_above]
    paths = run.image_paths()
    return {"threshold": warn_above, "images": [{"image": paths[finished[k]], "seen_share": float(seen[k])} for k in cut]}


def describe_failures(run: RunReader, groups: tuple[str, ...]) -> list[str]:
    """Every rejected record and every failed item of ``groups``, with its reason, one line each."""
    failures = [f"record {line}" for line in run.rejected_records()]
    for group in groups:
        failed = np.flatnonzero(run.status(group) == FAILED)
        failures += [f"{group[:-1]} {i}: {error}" for i, error in zip(failed, run.errors(group, failed))]
    return failures


def describe_accuracy(run: RunReader) -> dict[str, Any]:
    """How accurate the finished items of a run are: nodes and completeness errors per input, the inputs that
    missed the tolerance, and the pairs' completeness errors relative to their score scale.

    Pair errors are taken relative to ``|d_a| |d_b|`` (the largest the four-term value can be), not to the
    four-term value itself, which can be near zero for an accurate map and would then dominate any mean.
    """
    attribution = run.settings.attribution
    report: dict[str, Any] = {
        "tolerance": attribution.tolerance,
        "max_steps": attribution.max_steps,
        "n_steps": attribution.n_steps,
        "panel_layout": run.panel_layout,
        "not_converged": [],
    }
    for group, names in ((CAPTIONS, run.captions()), (IMAGES, run.image_paths())):
        done = run.status(group) == DONE
        nodes, relative = run.column(group, N_NODES), run.column(group, RELATIVE_COMPLETENESS_ERROR)
        map_error = run.column(group, MAP_ERROR_BOUND)
        missed = np.flatnonzero(done & ~run.column(group, IS_CONVERGED))
        report[group] = {
            "done": int(done.sum()),
            "nodes_mean": _statistic(np.mean, nodes[done]),
            "nodes_max": _statistic(np.max, nodes[done]),
            "endpoints_mean": _statistic(np.mean, run.column(group, N_ENDPOINTS)[done]),
            "relative_error_median": _statistic(np.median, relative[done]),
            "relative_error_max": _statistic(np.max, relative[done]),
            "map_error_bound_median": _statistic(np.median, map_error[done]),
            "map_error_bound_max": _statistic(np.max, map_error[done]),
            "not_converged": int(missed.size),
        }
        report["not_converged"] += [
            {
                "group": group,
                "index": int(i),
                "item": names[i],
                "n_nodes": int(nodes[i]),
                "relative_completeness_error": float(relative[i]),
                "map_error_bound": _finite(map_error[i]),
            }
            for i in missed
        ]
    done = run.status(PAIRS) == DONE
    pair_bound = run.column(PAIRS, MAP_ERROR_BOUND)
    # a pair map can be inexact although both its inputs are within the tolerance: a map small next to its inputs
    inexact = np.flatnonzero(done & np.array([is_inexact_pair(b, attribution.tolerance) for b in pair_bound], bool))
    captions, images = run.captions(), run.image_paths()
    caption_index, image_index = run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX)
    report["pairs"] = {
        "done": int(done.sum()),
        "relative_error_median": _statistic(np.median, run.column(PAIRS, RELATIVE_COMPLETENESS_ERROR)[done]),
        "relative_error_max": _statistic(np.max, run.column(PAIRS, RELATIVE_COMPLETENESS_ERROR)[done]),
        "error_max": _statistic(np.max, run.column(PAIRS, COMPLETENESS_ERROR)[done]),
        "bound_max": _statistic(np.max, run.column(PAIRS, COMPLETENESS_BOUND)[done]),
        "map_error_bound_median": _statistic(np.median, pair_bound[done]),
        "map_error_bound_max": _statistic(np.max, pair_bound[done]),
        "inexact_factor": INEXACT_PAIR_FACTOR,
        "inexact": [
            {"index": int(i), "caption": captions[caption_index[i]], "image": images[image_index[i]],
             "map_error_bound": _finite(pair_bound[i])}
            for i in inexact
        ],
    }
    return report


def _statistic(fn: Any, values: np.ndarray) -> float | None:
    """``fn`` of the values, None where there are none or the result is not finite (map error bounds of a fixed
    rule are NaN: unknown)."""
    return _finite(fn(values)) if values.size else None


def _finite(value: Any) -> float | None:
    return float(value) if np.isfinite(value) else None
