"""What a run file holds, as a plain dict (printed by ``xclip inspect``, or as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xclip.store import DONE, damaged_file_errors, FAILED, PENDING, open_run_file

STATUS = {PENDING: "pending", DONE: "done", FAILED: "failed"}
NOT_CONVERGED_HINT = (
    "raise attribution.max_steps or loosen attribution.tolerance; in float32 the relative error stops between "
    "about 3e-7 and 5e-6 (demo model), so tolerances below 1e-5 may need model.dtype float64"
)


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_file = run_dir if run_dir.suffix == ".h5" else run_dir / "run.h5"
    with open_run_file(run_file) as f, damaged_file_errors(run_file):
        counts = {}
        rejected = list(f["rejected_records"].asstr()[:])
        failures = [f"record {line}" for line in rejected]
        for group in ("captions", "images", "pairs"):
            status = f[group]["status"][:]
            counts[group] = {
                "total": int(status.size),
                "done": int((status == DONE).sum()),
                "failed": int((status == FAILED).sum()),
                "pending": int((status == PENDING).sum()),
            }
            errors = f[group]["error"].asstr()
            failures += [f"{group[:-1]} {i}: {errors[i]}" for i in np.flatnonzero(status == FAILED)]
        pairs, captions, images = f["pairs"], f["captions/text"].asstr()[:], f["images/path"].asstr()[:]
        status = pairs["status"][:]
        terms, errors, values = pairs["terms"][:], pairs["completeness_error"][:], pairs["four_term_value"][:]
        relative = pairs["relative_completeness_error"][:]
        rows = [
            {
                "index": int(i),
                "caption_index": int(c),
                "image_index": int(m),
                "caption": str(captions[c]),
                "image": str(images[m]),
                "status": STATUS[int(status[i])],
                "score": float(pairs["score"][i]),
                "terms": [float(t) for t in terms[i]] if status[i] == DONE else None,
                "four_term_value": float(values[i]),
                "completeness_error": float(errors[i]),
                "relative_completeness_error": float(relative[i]),
            }
            for i, (c, m) in enumerate(zip(pairs["caption_index"][:], pairs["image_index"][:]))
        ]
        return {
            "file": str(run_file),
            "model": f.attrs["model_name"],
            "created": f.attrs["created"],
            "xclip_version": f.attrs["xclip_version"],
            "config": json.loads(f.attrs["config"]),
            "counts": counts,
            "rejected_records": rejected,
            "accuracy": describe_accuracy(f),
            "failures": failures,
            # numbers of unfinished pairs are not results (their storage holds whatever the disk held)
            "pairs": [{k: (None if isinstance(v, float) and (row["status"] != "done" or np.isnan(v)) else v)
                       for k, v in row.items()} for row in rows],
        }


def describe_accuracy(f: h5py.File) -> dict[str, Any]:
    """How accurate the finished items of a run are: nodes and completeness errors per input, the inputs that
    missed the tolerance, and the pairs' completeness errors relative to their score scale.

    Pair errors are taken relative to ``|d_a| |d_b|`` (the largest the four-term value can be), not to the
    four-term value itself, which can be near zero for an accurate map and would then dominate any mean.
    """
    attribution = json.loads(f.attrs["config"])["attribution"]
    report: dict[str, Any] = {
        "tolerance": attribution["tolerance"],
        "max_steps": attribution["max_steps"],
        "n_steps": attribution["n_steps"],
        "not_converged": [],
    }
    for group, label in (("captions", "text"), ("images", "path")):
        items = f[group]
        done = items["status"][:] == DONE
        nodes, relative = items["n_nodes"][:], items["relative_completeness_error"][:]
        missed = np.flatnonzero(done & ~items["is_converged"][:])
        report[group] = {
            "done": int(done.sum()),
            "nodes_mean": _statistic(np.mean, nodes[done]),
            "nodes_max": _statistic(np.max, nodes[done]),
            "relative_error_median": _statistic(np.median, relative[done]),
            "relative_error_max": _statistic(np.max, relative[done]),
            "not_converged": int(missed.size),
        }
        names = items[label].asstr()[missed] if missed.size else []  # one read, not one per item
        report["not_converged"] += [
            {
                "group": group,
                "index": int(i),
                "item": str(name),
                "n_nodes": int(nodes[i]),
                "relative_completeness_error": float(relative[i]),
            }
            for i, name in zip(missed, names)
        ]
    pairs = f["pairs"]
    done = pairs["status"][:] == DONE
    report["pairs"] = {
        "done": int(done.sum()),
        "relative_error_median": _statistic(np.median, pairs["relative_completeness_error"][:][done]),
        "relative_error_max": _statistic(np.max, pairs["relative_completeness_error"][:][done]),
        "error_max": _statistic(np.max, pairs["completeness_error"][:][done]),
        "bound_max": _statistic(np.max, pairs["completeness_bound"][:][done]),
    }
    return report


def _statistic(fn: Any, values: np.ndarray) -> float | None:
    return float(fn(values)) if values.size else None
