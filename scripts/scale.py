"""What a large `all` run costs: N synthetic scenes x their distinct captions on the demo model, end to end.

    python scripts/scale.py [--n 2000] [--contributions store|none] [--pair-maps none] [--kill-at 0.5] [--busy 4] [--out scale.json]

Runs `xclip attribute` in a child process (so that its memory is its own) with `pairing.mode: all` and reports
seconds, pairs per second, the child's resident memory sampled every half second (peak, and per tenth of the run,
to show whether it grows with the pairs done), and run-file bytes per pair. ``--kill-at F`` SIGKILLs the child
once F of the expected time has passed (``--expected-seconds``, or the pairs at 5,000 per second), then runs the
same command again, which resumes; the report then holds both invocations and the pairs the resumed one found
finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from contention import busy
from memory import watch

from xclip.analysis.synthetic import generate, write_scenes

DEMO_MODEL = Path(__file__).resolve().parents[1] / "xclip" / "models" / "shapes-clip"


def attribute(command: list[str], kill_after: float | None) -> dict:
    """Run ``command``, sampling its memory; SIGKILL it after ``kill_after`` seconds when given."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trace = watch(child, stop_after=kill_after)
    stdout, stderr = child.communicate()
    result = {"seconds": round(trace.seconds, 1), "returncode": child.returncode, "peak_rss_mib": trace.peak_mib,
              "peak_rss_mib_per_tenth": trace.peak_mib_per_tenth()}
    if child.returncode == 0:
        result["summary"] = json.loads(stdout.splitlines()[0])
    elif kill_after is None:
        sys.exit(f"xclip attribute failed ({child.returncode}):\n{stderr}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="scenes: N images and their distinct captions, all pairs")
    parser.add_argument("--contributions", choices=["store", "none"], default="store", help="output.contributions")
    parser.add_argument("--pair-maps", choices=["store", "none"], default="none")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kill-at", type=float, help="SIGKILL the run after this share of the expected time, then resume it")
    parser.add_argument("--expected-seconds", type=float, help="the uninterrupted run's time, for --kill-at (default: the pairs over 5,000 per second)")
    parser.add_argument("--busy", type=int, default=0, help="run beside this many busy processes (a shared node)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        scenes = generate(args.n, seed=30000)
        write_scenes(scenes, root / "scenes")
        n_captions = len({scene.caption for scene in scenes})
        config = {
            "model": {"name": str(DEMO_MODEL), "device": "cpu"},
            "data": {"format": "imagefolder", "root": "scenes", "metadata": "scenes/metadata.jsonl"},
            "pairing": {"mode": "all"},
            "output": {"directory": "run", "contributions": args.contributions,
                       **({"pair_maps": args.pair_maps} if args.contributions == "store" else {})},
            "runtime": {"batch_size": args.batch_size},
        }
        (root / "run.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "xclip", "attribute", str(root / "run.yaml"), "--json", "-q"]
        invocations = []
        with busy(args.busy):
            if args.kill_at is not None:
                expected = args.expected_seconds or n_captions * args.n / 5000
                invocations.append(attribute(command, kill_after=args.kill_at * expected))
            invocations.append(attribute(command, kill_after=None))
        summary = invocations[-1]["summary"]
        n_bytes = (root / "run" / "run.h5").stat().st_size
    n_pairs = summary["pairs"]
    seconds = sum(i["seconds"] for i in invocations)
    report = {
        "n_images": args.n,
        "n_captions": n_captions,
        "pairs": n_pairs,
        "contributions": args.contributions,
        "busy_processes": args.busy,
        "pair_maps": args.pair_maps if args.contributions == "store" else "none",
        "seconds": round(seconds, 1),
        "pairs_per_second": round(n_pairs / seconds, 1),
        "peak_rss_mib": max(i["peak_rss_mib"] for i in invocations),
        "invocations": [{k: v for k, v in i.items() if k != "summary"} for i in invocations],
        "pairs_finished_before_resume": summary.get("skipped", 0) if args.kill_at is not None else None,
        "pairs_done": summary.get("done", 0) + summary.get("skipped", 0),
        "failed": summary.get("failed", 0),
        "run_file_bytes": n_bytes,
        "bytes_per_pair": round(n_bytes / n_pairs, 1),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
