"""What `xclip words` costs on a large run: seconds, and resident memory over the audit.

    python scripts/words_scale.py RUN_DIR [--out words-scale.json]

Runs `xclip words RUN_DIR --quiet` in a child process (so that its memory is its own), writing words.json and the
chart into a temporary folder, samples the child's resident memory every half second and reports the seconds, the
pairs audited per second and the peak memory per tenth of the audit: flat when only running sums per word are
held, whatever the number of pairs. `python scripts/scale.py --contributions none` makes a large summary run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from memory import watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory")
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args()
    xclip = Path(sys.executable).parent / "xclip"
    with tempfile.TemporaryDirectory() as folder:
        child = subprocess.Popen([str(xclip), "words", str(args.run), "--quiet", "--output", folder],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        trace = watch(child)
        seconds = trace.seconds
        if child.returncode != 0:
            sys.exit(f"xclip words failed ({child.returncode}): {child.stderr.read() if child.stderr else ''}")
        audit = json.loads((Path(folder) / "words.json").read_text())
    report = {
        "run": str(args.run), "pairs": audit["n_pairs"], "words": audit["n_words"], "seconds": round(seconds, 1),
        "pairs_per_second": round(audit["n_pairs"] / seconds),
        "peak_resident_mib": trace.peak_mib,
        "peak_resident_mib_per_tenth": trace.peak_mib_per_tenth(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
