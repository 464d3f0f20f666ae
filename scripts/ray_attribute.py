"""A run's shards as Ray tasks, for clusters without Slurm: one task per shard block, each running
`xclip attribute CONFIG --shard I/N` on the node Ray chose (one GPU per task, or CPUs only), a task whose shard did
not finish run again (the run store resumes its shard), then the shards merged into OUTPUT/run.h5.

    python scripts/ray_attribute.py CONFIG --shards N [--address auto] [--cpu] [--cpus-per-task C] [--retries R] [section.key=value ...]

Needs the `ray` extra (`pip install -e '.[ray]'`) and xclip in the same environment on every node, and the config,
the data and output.directory at the same paths on every node and on this one (a shared file system), as a Slurm
array does. Without --address it starts a Ray instance on this machine. The plan (which block each task takes,
its command line, which ends a rerun can finish) is xclip.run.workers', the one `xclip attribute --devices` runs.
Ctrl-C or SIGTERM cancels the tasks (their runs stop; every batch written is kept); running the same command
again resumes every shard.
Exit codes as `xclip attribute`'s: 0, 3 (failed items), 75 (interrupted), 1 or 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from xclip.errors import XclipError
from xclip.run.workers import (
    EXIT_FINISHED,
    EXIT_INTERRUPTED,
    WORKER_OPTION,
    ShardTask,
    attribute_arguments,
    combined_exit_code,
    load_spread_config,
    needs_rerun,
    outcome_of,
    parse_report,
    plan_shards,
    worker_environment,
    worker_threads,
)


def attribute_shard(arguments: list[str], threads: int | None, command: str) -> tuple[int, dict, str]:
    """One task: `xclip attribute` with ``arguments`` as a worker (``--worker``, as under `--devices`) in a child
    process of the Ray worker, so that a crash of the run takes only the child, and the child stops at a batch
    when the Ray worker dies (its stdin closes); its exit code, its summary and its error."""
    environment = worker_environment(threads, os.environ)  # Ray's GPU choice stays in CUDA_VISIBLE_DEVICES
    stdin, parent_end = os.pipe()  # held open, never written: it closes when this process dies
    try:
        child = subprocess.run([sys.executable, "-m", "xclip", *arguments, WORKER_OPTION, command], stdin=stdin,
                               capture_output=True, text=True, env=environment)
    finally:
        os.close(stdin)
        os.close(parent_end)
    reports = [report for line in child.stdout.splitlines() if (report := parse_report(line)) is not None]
    summary = reports[-1] if reports and "skipped" in reports[-1] else {}
    return child.returncode, summary, _error_of(child.returncode, child.stderr.strip().splitlines())


def _error_of(code: int, lines: list[str]) -> str:
    """What a run that did not finish said about it: its error message, or a traceback's exception; nothing for a
    run that finished (its warnings are the merged run's) or that a signal ended."""
    errors = [line for line in lines if line.startswith("Error:")]
    if code in EXIT_FINISHED or code < 0:
        return ""
    if errors:
        return errors[-1]
    return lines[-1] if "Traceback (most recent call last):" in lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--shards", type=int, required=True, help="shard blocks: one Ray task each")
    parser.add_argument("--address", default=None, help="Ray cluster address (auto, ray://HOST:10001); default: a Ray instance on this machine")
    parser.add_argument("--cpu", action="store_true", help="tasks on CPUs only (num_gpus=0); default: one GPU per task")
    parser.add_argument("--cpus-per-task", type=int, default=1, help="CPUs Ray reserves per task; its runtime.threads unless the config sets them")
    parser.add_argument("--retries", type=int, default=3, help="reruns of a task whose shard did not finish")
    args = parser.parse_intermixed_args()  # overrides before or after the options
    config = args.config.resolve()  # the tasks' working directories are Ray's
    try:
        run_config = load_spread_config(config, args.overrides, args.shards)
        tasks = plan_shards(["cpu" if args.cpu else "cuda:0"] * args.shards,  # cuda:0: the one GPU Ray leaves a task
                            worker_threads(1, run_config.runtime.threads, args.cpus_per_task))
    except XclipError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2

    import ray

    ray.init(address=args.address, logging_level="warning")
    remote = ray.remote(num_gpus=0 if args.cpu else 1, num_cpus=args.cpus_per_task, max_retries=0)(attribute_shard)

    def submit(task: ShardTask) -> ray.ObjectRef:
        return remote.remote(attribute_arguments(config, args.overrides, task), task.threads, command)

    command = " ".join(["python", *sys.argv])  # what each shard's run file records as the command that made it
    stop_signals: list[int] = []  # Ctrl-C and SIGTERM end the loop below
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda received, _frame: stop_signals.append(received))
    running = {submit(task): task for task in tasks}
    attempts = dict.fromkeys(tasks, 1)
    codes: dict[ShardTask, int | None] = {}  # None: Ray lost the task (its node or worker died)
    while running and not stop_signals:
        ready, _ = ray.wait(list(running), timeout=1.0)
        if not ready:
            continue
        task = running.pop(ready[0])
        try:
            code, summary, said = ray.get(ready[0])
        except ray.exceptions.RayError as e:
            code, summary, said = None, {}, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        end = f"exit {code}" if code is not None else "lost"
        if (code is None or needs_rerun(code)) and attempts[task] <= args.retries:
            attempts[task] += 1
            print(f"{task.name}: {end}{f': {said}' if said else ''}; attempt {attempts[task]} of {args.retries + 1} resumes it",
                  file=sys.stderr, flush=True)
            running[submit(task)] = task
            continue
        codes[task] = code
        done = f", {summary['done']} pairs done, {summary['skipped']} found done" if summary else f": {said}"
        print(f"{task.name}: {end}{done}", file=sys.stderr, flush=True)
    if stop_signals:
        for ref in running:
            # force: after a signal, Ray (2.60) no longer delivers a gentle cancel to running tasks; the Ray worker
            # dies, its child stops at a batch (its stdin closed) unless Ray kills it too; the store keeps every
            # written batch either way
            ray.cancel(ref, force=True)
        ray.wait(list(running), num_returns=len(running), timeout=300)
        print("interrupted: run the same command again to resume every shard", file=sys.stderr)
        return EXIT_INTERRUPTED
    outcomes = [outcome_of(code) if code is not None else "failed" for code in codes.values()]
    if any(outcome != "finished" for outcome in outcomes):
        print("not merged: run the same command again to resume the unfinished shards", file=sys.stderr)
        return combined_exit_code([outcome for outcome in outcomes if outcome != "finished"])
    from xclip.store.merge import merge_shards

    print(merge_shards(run_config.output.directory))
    return 3 if 3 in codes.values() else 0


if __name__ == "__main__":
    sys.exit(main())
