"""What a large `all` run costs: N synthetic scenes x their N captions on the demo model, end to end.

    python scripts/scale.py [--n 2000] [--pair-maps none] [--out scale.json]

Runs `xclip attribute` in a child process (so that its peak memory is its own) with `pairing.mode: all` and
reports seconds, pairs per second, the child's peak RSS, and run-file bytes per pair and per input.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from xclip.analysis.synthetic import generate, write_scenes

DEMO_MODEL = Path(__file__).resolve().parents[1] / "xclip" / "models" / "shapes-clip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="scenes: N images and N captions, N x N pairs")
    parser.add_argument("--pair-maps", choices=["store", "none"], default="none")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_scenes(generate(args.n, seed=30000), root / "scenes")
        config = {
            "model": {"name": str(DEMO_MODEL), "device": "cpu"},
            "data": {"format": "imagefolder", "root": "scenes", "metadata": "scenes/metadata.jsonl"},
            "pairing": {"mode": "all"},
            "output": {"directory": "run", "pair_maps": args.pair_maps},
            "runtime": {"batch_size": args.batch_size},
        }
        (root / "run.yaml").write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "xclip", "attribute", str(root / "run.yaml"), "--json", "-q"],
                                capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"xclip attribute failed ({result.returncode}):\n{result.stderr}")
        summary = json.loads(result.stdout.splitlines()[0])
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        n_bytes = (root / "run" / "run.h5").stat().st_size
        n_pairs = summary["pairs"]
    report = {
        "n_captions": args.n,
        "n_images": args.n,
        "pairs": n_pairs,
        "pair_maps": args.pair_maps,
        "seconds": round(seconds, 1),
        "pairs_per_second": round(n_pairs / seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "run_file_bytes": n_bytes,
        "bytes_per_pair": round(n_bytes / n_pairs, 1),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
