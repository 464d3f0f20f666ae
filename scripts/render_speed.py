"""How fast figures are drawn: per-word, span and box figures of a finished run, on one CPU core.

    python scripts/render_speed.py [RUN_DIR] [--pairs 100] [--out speed.json]

RUN_DIR defaults to the demo run (`make demo` writes runs/demo; without it this script attributes the demo
into a temporary directory first). The process is pinned to one core; reading the run, decoding images,
drawing and writing PNG files are all timed, the interpreter's start and imports are not.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from xclip.show.render import render_run

ROOT = Path(__file__).resolve().parents[1]


def timed(run_dir: Path, out: Path, **selection: object) -> dict[str, float]:
    start = time.perf_counter()
    report = render_run(run_dir, out=out, **selection)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    return {"figures": len(report.written), "seconds": seconds, "figures_per_s": len(report.written) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=ROOT / "runs" / "demo")
    parser.add_argument("--pairs", type=int, default=100, help="figures of each kind")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    with tempfile.TemporaryDirectory() as folder:
        run_dir = args.run_dir
        if not (run_dir / "run.h5").exists():
            from xclip.config import load_config
            from xclip.run.runner import run

            run_dir = run(load_config(ROOT / "configs" / "demo.yaml", [f"output.directory={folder}/demo"])).directory
        render_run(run_dir, out=Path(folder) / "warm-up", limit=1)  # imports matplotlib's colour map and font
        report = {
            "run": str(args.run_dir.name),
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "per_word": timed(run_dir, Path(folder) / "words", limit=args.pairs),
            "span": timed(run_dir, Path(folder) / "span", span="circle", limit=args.pairs),
            "box": timed(run_dir, Path(folder) / "box", box=(0.0, 0.0, 32.0, 32.0), limit=args.pairs),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
