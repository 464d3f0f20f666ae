"""Wall and CPU time of attribute, evaluate --baselines and calibrate, idle and beside busy processes.

    python scripts/contention.py [--busy 4] [--repeats 1] [--modes before,after] [--commands attribute,evaluate,calibrate]

Each command runs as its own ``python -m xclip`` process on the shipped demo: attribute of configs/demo.yaml,
evaluate --baselines all on its first 40 pairs (--limit 40), calibrate --inputs 4. Every command is timed idle and
then beside ``--busy`` processes that loop in pure Python (a shared node); they are stopped when it ends. CPU time
is the process's user + system time from wait4. With --repeats R the medians are printed.

Modes set the environment of the timed process (inherited thread and wait settings are removed first):

* ``before``: torch's defaults, as xclip ran before it sized its threads: one intra-op thread per CPU in the
  affinity mask, and libgomp's default wait (a waiting thread spins about 300,000 rounds before it sleeps:
  GOMP_SPINCOUNT=300000 is what libgomp uses when OMP_WAIT_POLICY is unset; xclip keeps a spin count the user set).
* ``after``: nothing set: xclip's policy decides (xclip.threads: the CPUs the process may use, a passive wait).
* ``one-thread``: OMP_NUM_THREADS=1, with xclip's passive wait.

A command still running after --limit-s seconds is stopped and printed as a lower bound (``>``), so that one full
run stays near ten minutes on a 2-core machine however slow the ``before`` mode gets beside the load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xclip.threads import WAIT_SETTINGS, affinity_cpus, decide_threads

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *WAIT_SETTINGS)
LIBGOMP_DEFAULT_SPIN = "300000"


def modes() -> dict[str, dict[str, str]]:
    """Each mode's additions to the environment of a timed command."""
    return {
        "before": {"OMP_NUM_THREADS": str(affinity_cpus()), "GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN},
        "after": {},
        "one-thread": {"OMP_NUM_THREADS": "1"},
    }


def commands(folder: Path, run_dir: Path, tag: str) -> dict[str, list[str]]:
    """The timed command lines; ``tag`` keeps each run's outputs apart."""
    xclip = [sys.executable, "-m", "xclip"]
    return {
        "attribute": [*xclip, "attribute", str(DEMO_CONFIG), f"output.directory={folder / ('attribute-' + tag)}", "-q"],
        "evaluate": [*xclip, "evaluate", str(run_dir), "--baselines", "all", "--limit", "40",
                     "--out", str(folder / f"evaluate-{tag}"), "-q"],
        "calibrate": [*xclip, "calibrate", str(DEMO_CONFIG), "--inputs", "4",
                      "--output", str(folder / f"layout-{tag}.json"), "-q"],
    }


def timed(argv: list[str], env: dict[str, str], log: Path, limit_s: float) -> tuple[float, float, bool]:
    """Wall and CPU seconds (user + system) of one command, and whether it ran past ``limit_s`` (it is then
    stopped: its times are those until then); exits with the command's log if it fails."""
    with log.open("w") as stream:
        start = time.perf_counter()
        # a process group of its own, to stop it with its children; not a session of its own: Linux's autogroup
        # would then share the CPUs out per session, and the command would not compete with the busy loops
        process = subprocess.Popen(argv, env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT, process_group=0)
        is_cut = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not is_cut and time.perf_counter() - start > limit_s:
                os.killpg(process.pid, signal.SIGKILL)  # its own group: the command and nothing else
                is_cut = True
            time.sleep(0.05)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 and not is_cut:
        sys.exit(f"{' '.join(argv)} failed (exit {process.returncode}):\n{log.read_text()}")
    return wall, usage.ru_utime + usage.ru_stime, is_cut


@contextmanager
def busy(n_processes: int) -> Iterator[None]:
    """``n_processes`` pure-Python busy loops for the duration of the block."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_processes)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def cell(values: list[tuple[float, float, bool]], index: int) -> str:
    """The median of one column; ``>`` where a run was stopped at the limit."""
    median = statistics.median(value[index] for value in values)
    return f"{'>' if any(value[2] for value in values) else ''}{median:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=4, help="busy processes beside the loaded measurements")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement (medians are printed)")
    parser.add_argument("--modes", default="before,after", help=f"comma-separated: {', '.join(modes())}")
    parser.add_argument("--commands", default="attribute,evaluate,calibrate", help="comma-separated")
    parser.add_argument("--limit-s", type=float, default=120.0, help="stop a command after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    chosen_modes = {name: modes()[name] for name in args.modes.split(",")}
    chosen_commands = args.commands.split(",")

    base_env = {key: value for key, value in os.environ.items() if key not in THREAD_SETTINGS}
    times: dict[tuple[str, str, str], list[tuple[float, float, bool]]] = {}
    loads: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        base_env["XCLIP_LAYOUT_CACHE"] = str(folder / "layout-cache")  # the user's calibrations stay out
        run_dir = folder / "demo"
        setup = [sys.executable, "-m", "xclip", "attribute", str(DEMO_CONFIG), f"output.directory={run_dir}", "-q"]
        timed(setup, base_env, folder / "setup.log", math.inf)
        print(f"CPUs: {affinity_cpus()}; xclip's threads: {decide_threads(environ=base_env)}", file=sys.stderr)
        for load in ("idle", "loaded"):
            loads[load] = list(os.getloadavg())
            with busy(args.busy if load == "loaded" else 0):
                for repeat in range(args.repeats):
                    for command in chosen_commands:
                        for mode, additions in chosen_modes.items():  # interleaved: drift hits every mode alike
                            tag = f"{command}-{mode}-{load}-{repeat}"
                            argv = commands(folder, run_dir, tag)[command]
                            measured = timed(argv, {**base_env, **additions}, folder / f"{tag}.log", args.limit_s)
                            times.setdefault((command, mode, load), []).append(measured)
                            print(f"{tag}: {measured[0]:.1f} s wall, {measured[1]:.1f} s CPU"
                                  f"{' (stopped at the limit)' if measured[2] else ''}", file=sys.stderr)

    print(f"load average (1, 5, 15 min) before the idle runs: {' '.join(f'{x:.2f}' for x in loads['idle'])}")
    print(f"| command | mode | idle wall s | idle CPU s | wall s beside {args.busy} busy | CPU s | loaded / idle |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for command in chosen_commands:
        for mode in chosen_modes:
            idle, loaded = times[(command, mode, "idle")], times[(command, mode, "loaded")]
            ratio = statistics.median(v[0] for v in loaded) / statistics.median(v[0] for v in idle)
            is_cut = any(v[2] for v in loaded)  # the ratio is then a lower bound
            rows.append({"command": command, "mode": mode, "idle": idle, "loaded": loaded, "ratio": ratio})
            print(f"| {command} | {mode} | {cell(idle, 0)} | {cell(idle, 1)} | {cell(loaded, 0)} | {cell(loaded, 1)} | "
                  f"{'>' if is_cut else ''}{ratio:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"busy": args.busy, "repeats": args.repeats, "cpus": affinity_cpus(),
                                         "load_average": loads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
