"""Median wall time of `import xclip`, `xclip --help` and `xclip SUB --help` in fresh processes, and what they import."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "matplotlib", "h5py")
MARK = "@@cli_speed@@"
PROBE = f"import atexit, json, sys; atexit.register(lambda: print({MARK!r} + json.dumps([m for m in {HEAVY!r} if m in sys.modules])))\n"


def subcommands() -> list[str]:
    from xclip.cli.app import app

    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


def measure(code: str, runs: int) -> dict[str, object]:
    """Median wall seconds of ``python -c code`` in fresh processes, its exit code and the heavy modules it imported."""
    times, heavy, rc = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE + code], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        rc = rc or done.returncode
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        heavy = json.loads(lines[-1][len(MARK):]) if lines else ["?"]
    return {"seconds": statistics.median(times), "exit_code": rc, "imported": heavy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    cases = {"import xclip": "import xclip"}
    for argv in [["--help"], *([name, "--help"] for name in subcommands())]:
        cases["xclip " + " ".join(argv)] = f"sys.argv = ['xclip', *{argv!r}]\nfrom xclip.cli.app import main\nmain()"
    results = {label: measure(code, args.runs) for label, code in cases.items()}
    width = max(map(len, results))
    print(f"{'command':<{width}}  {'median s':>8}  exit  heavy modules imported")
    for label, r in results.items():
        print(f"{label:<{width}}  {r['seconds']:>8.3f}  {r['exit_code']:>4}  {', '.join(r['imported']) or '-'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
