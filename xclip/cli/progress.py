"""Progress of long commands on stderr: a Rich bar on a terminal, plain lines in logs (Slurm, cron), nothing
when quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from xclip.cli.tables import stderr

LOG_INTERVAL_S = 30.0  # in logs, the longest silence of work whose length is not known in advance (calibrate)


def progress_callback(quiet: bool):  # type: ignore[no-untyped-def]
    """A Rich bar on a terminal; plain lines every 10% in logs (Slurm, cron); nothing when quiet."""
    if quiet:
        return None, None
    if stderr.is_terminal:
        bar = Progress(
            TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=stderr,
        )
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            task = bar.tasks[tasks[stage]]
            speed = task.speed
            bar.update(tasks[stage], completed=done, total=total, rate=f"{speed:.1f} items/s" if speed else "")

        return bar, update
    last: dict[str, int] = {}

    def log(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - last.get(stage, 0) >= step:
            last[stage] = done
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    return None, log


@contextmanager
def plain_progress(quiet: bool, unit: str) -> Iterator[Any]:
    """A spinner-like count on a terminal; in logs (Slurm, cron) a line when a stage starts and then at most every
    LOG_INTERVAL_S seconds, so that long work never looks hung; nothing when quiet. For work of unknown length."""
    if quiet:
        yield None
        return
    if not stderr.is_terminal:
        last: dict[str, float] = {}

        def log(stage: str, done: int) -> None:
            now = time.monotonic()
            if stage not in last or now - last[stage] >= LOG_INTERVAL_S:
                last[stage] = now
                print(f"calibrating {stage}: {done} {unit}", file=sys.stderr, flush=True)

        yield log
        return
    with Progress(TextColumn("{task.description}"), TextColumn("{task.completed} " + unit), console=stderr, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"calibrating {stage}", total=None)
            bar.update(tasks[stage], completed=done)

        yield update
