"""What a run file holds, as a plain dict (printed by ``xclip inspect``, or as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from xclip.store import DONE, FAILED, PENDING, open_run_file

STATUS = {PENDING: "pending", DONE: "done", FAILED: "failed"}


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_file = run_dir if run_dir.suffix == ".h5" else run_dir / "run.h5"
    with open_run_file(run_file) as f:
        counts = {}
        failures = []
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
        done = status == DONE
        relative = errors[done] / np.maximum(np.abs(values[done]), 1e-12)
        rows = [
            {
                "index": int(i),
                "caption_index": int(c),
                "image_index": int(m),
                "caption": str(captions[c]),
                "image": str(images[m]),
                "status": STATUS[int(status[i])],
                "score": float(pairs["score"][i]),
                "terms": [float(t) for t in terms[i]],
                "four_term_value": float(values[i]),
                "completeness_error": float(errors[i]),
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
            "completeness_error": {
                "mean": float(errors[done].mean()) if done.any() else float("nan"),
                "max": float(errors[done].max()) if done.any() else float("nan"),
                "mean_relative": float(relative.mean()) if done.any() else float("nan"),
            },
            "failures": failures,
            "pairs": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()} for row in rows],
        }
