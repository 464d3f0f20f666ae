"""Wall and CPU time of attribute, evaluate --baselines and calibrate, idle and beside busy processes.

    python scripts/contention.py [--busy 4] [--repeats 1] [--modes before,after] [--commands attribute,evaluate,calibrate]
    python scripts/contention.py --modes after --commands test,test-fast --limit-s 3600

Each command runs as its own ``python -m xclip`` process on the shipped demo: attribute of configs/demo.yaml,
evaluate --baselines all on its first 40 pairs (--limit 40), calibrate --inputs 4; ``test`` and ``test-fast`` run
the test suite as ``make test`` and ``make test-fast`` do. Every command is timed idle and
then beside ``--busy`` processes that loop in pure Python (a shared node); they are stopped when it ends. CPU time
is the process's user + system time from wait4; ``runnable`` is the mean of /proc/stat's procs_running while the
command ran (this script and the command included: about 2 idle, busy + 2 loaded), so that other work sharing
the machine shows. With --repeats R the medians are printed.

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
from typing import NamedTuple

from xclip.threads import WAIT_SETTINGS, affinity_cpus, decide_threads

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *WAIT_SETTINGS)
LIBGOMP_DEFAULT_SPIN = "300000"


class Measurement(NamedTuple):
    wall_s: float
    cpu_s: float
    runnable: float  # mean of /proc/stat's procs_running while the command ran (other people's work shows here)
    is_cut: bool  # stopped at --limit-s: the times are lower bounds


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
        # the test suite as `make test` and `make test-fast` run it (give --limit-s room: about 8 and 2 minutes idle)
        "test": [sys.executable, "-m", "pytest", "-q"],
        "test-fast": [sys.executable, "-m", "pytest", "-q", "-m", "not slow"],
    }


def runnable() -> int | None:
    """Processes running or waiting for a CPU now, this script and its children included (Linux)."""
    try:
        with open("/proc/stat") as stat:
            return next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError):
        return None


def timed(argv: list[str], env: dict[str, str], log: Path, limit_s: float) -> Measurement:
    """One command's wall and CPU seconds (user + system) and the mean number of runnable processes while it ran;
    a command still running after ``limit_s`` is stopped (its times are those until then). Exits with the
    command's log if it fails."""
    samples: list[int] = []
    with log.open("w") as stream:
        start = time.perf_counter()
        # a process group of its own, to stop it with its children; not a session of its own: Linux's autogroup
        # would then share the CPUs out per session, and the command would not compete with the busy loops
        process = subprocess.Popen(argv, env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT,
                                   preexec_fn=os.setpgrp)
        is_cut = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not is_cut and time.perf_counter() - start > limit_s:
                os.killpg(process.pid, signal.SIGKILL)  # its own group: the command and nothing else
                is_cut = True
            samples += [n for n in [runnable()] if n is not None]
            time.sleep(0.05)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 and not is_cut:
        sys.exit(f"{' '.join(argv)} failed (exit {process.returncode}):\n{log.read_text()}")
    return Measurement(wall, usage.ru_utime + usage.ru_stime, statistics.fmean(samples) if samples else math.nan, is_cut)


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


def cell(values: list[Measurement], field: str) -> str:
    """The median of one field; ``>`` where a run was stopped at the limit."""
    median = statistics.median(getattr(value, field) for value in values)
    return f"{'>' if field != 'runnable' and any(value.is_cut for value in values) else ''}{median:.1f}"


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
    times: dict[tuple[str, str, str], list[Measurement]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        base_env["XCLIP_LAYOUT_CACHE"] = str(folder / "layout-cache")  # the user's calibrations stay out
        run_dir = folder / "demo"
        setup = [sys.executable, "-m", "xclip", "attribute", str(DEMO_CONFIG), f"output.directory={run_dir}", "-q"]
        timed(setup, base_env, folder / "setup.log", math.inf)
        print(f"CPUs: {affinity_cpus()}; xclip's threads: {decide_threads(environ=base_env)}", file=sys.stderr)
        for load in ("idle", "loaded"):
            with busy(args.busy if load == "loaded" else 0):
                for repeat in range(args.repeats):
                    for command in chosen_commands:
                        for mode, additions in chosen_modes.items():  # interleaved: drift hits every mode alike
                            tag = f"{command}-{mode}-{load}-{repeat}"
                            argv = commands(folder, run_dir, tag)[command]
                            measured = timed(argv, {**base_env, **additions}, folder / f"{tag}.log", args.limit_s)
                            times.setdefault((command, mode, load), []).append(measured)
                            print(f"{tag}: {measured.wall_s:.1f} s wall, {measured.cpu_s:.1f} s CPU, "
                                  f"{measured.runnable:.1f} runnable{' (stopped at the limit)' * measured.is_cut}",
                                  file=sys.stderr)

    print(f"| command | mode | idle wall s | idle CPU s | runnable | wall s beside {args.busy} busy | CPU s | runnable "
          "| loaded / idle |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for command in chosen_commands:
        for mode in chosen_modes:
            idle, loaded = times[(command, mode, "idle")], times[(command, mode, "loaded")]
            ratio = statistics.median(v.wall_s for v in loaded) / statistics.median(v.wall_s for v in idle)
            is_cut = any(v.is_cut for v in loaded)  # the ratio is then a lower bound
            rows.append({"command": command, "mode": mode, "idle": [v._asdict() for v in idle],
                         "loaded": [v._asdict() for v in loaded], "ratio": ratio})
            print(f"| {command} | {mode} | {cell(idle, 'wall_s')} | {cell(idle, 'cpu_s')} | {cell(idle, 'runnable')} | "
                  f"{cell(loaded, 'wall_s')} | {cell(loaded, 'cpu_s')} | {cell(loaded, 'runnable')} | "
                  f"{'>' if is_cut else ''}{ratio:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"busy": args.busy, "repeats": args.repeats, "cpus": affinity_cpus(),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
