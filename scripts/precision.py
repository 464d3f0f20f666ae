"""What `output.precision: float16` adds to the maps: the demo scenes, every caption with every image, run once
in float32 and once in float16 storage, compared map by map.

    python scripts/precision.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml
from convergence import DEMO_MODEL  # the script beside this one

from xclip.config import load_config
from xclip.run.runner import run
from xclip.store.reader import RunReader

DEMO_SCENES = Path(__file__).resolve().parents[1] / "configs" / "demo" / "scenes"


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shutil.copytree(DEMO_SCENES, root / "scenes")
        for precision in ("float32", "float16"):
            config = {
                "model": {"name": str(DEMO_MODEL), "device": "cpu"},
                "data": {"format": "imagefolder", "root": "scenes", "metadata": "scenes/metadata.jsonl"},
                "pairing": {"mode": "all"},
                "output": {"directory": precision, "precision": precision, "pair_maps": "store"},
            }
            (root / f"{precision}.yaml").write_text(yaml.safe_dump(config))
            run(load_config(root / f"{precision}.yaml"))
            with RunReader(root / precision) as stored:
                maps = [stored.interactions(p) for p in range(len(stored.status("pairs")))]
                relative = stored.column("pairs", "relative_completeness_error")
            results[precision] = (maps, relative, (root / precision / "run.h5").stat().st_size)
    (full, full_errors, full_bytes), (half, half_errors, half_bytes) = results["float32"], results["float16"]
    differences = np.array([np.abs(a - b).max() / np.abs(a).max() for a, b in zip(full, half)])
    print(json.dumps({
        "pairs": len(differences),
        "map_difference_relative_to_map_max_median": float(np.median(differences)),
        "map_difference_relative_to_map_max_max": float(differences.max()),
        "pair_relative_completeness_error_float32": {"median": float(np.median(full_errors)), "max": float(full_errors.max())},
        "pair_relative_completeness_error_float16": {"median": float(np.median(half_errors)), "max": float(half_errors.max())},
        "run_file_bytes": {"float32": full_bytes, "float16": half_bytes},
    }, indent=2))


if __name__ == "__main__":
    main()
