"""What a batch scheduler tells a process: which shard of a run is its own (Slurm array and task variables,
torchrun's rank), and, by signals, that its time is running out."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from xclip.cli.tables import stderr
from xclip.errors import ConfigError


def shard_overrides(shard: str | None) -> list[str]:
    """``runtime.shard_index``/``num_shards`` overrides from ``I/N`` or from the environment (``env``)."""
    if shard is None:
        return []
    if shard == "env":
        index, count = _shard_from_environment(os.environ)
    else:
        index_text, _, count_text = shard.partition("/")
        if not (index_text.isdigit() and count_text.isdigit()):
            raise ConfigError(f"--shard must be I/N (such as 3/32) or env, got {shard!r}")
        index, count = int(index_text), int(count_text)
    return [f"runtime.shard_index={index}", f"runtime.num_shards={count}"]


def _shard_from_environment(env: Mapping[str, str]) -> tuple[int, int]:
    """This process's shard and the number of shards: a Slurm array's task, else torchrun's rank, else a Slurm
    task of a multi-task job."""

    def number(name: str, default: int | None = None, minimum: int | None = None) -> int:
        text = env.get(name)
        if text is None and default is not None:
            return default
        try:
            value = int(str(text))
        except ValueError:
            msg = f"--shard env: {name}={text!r} is not a whole number"
            raise ConfigError(msg) from None
        if minimum is not None and value < minimum:
            msg = f"--shard env: {name}={text!r} must be at least {minimum}"
            raise ConfigError(msg)
        return value

    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # array ids need not start at 0 or be contiguous: --array=1-7:2 gives ids 1, 3, 5, 7
        low, step = number("SLURM_ARRAY_TASK_MIN", 0), number("SLURM_ARRAY_TASK_STEP", 1, minimum=1)
        return (number("SLURM_ARRAY_TASK_ID") - low) // step, number("SLURM_ARRAY_TASK_COUNT")
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or srun with these exported
        return number("RANK"), number("WORLD_SIZE")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return number("SLURM_PROCID"), number("SLURM_NTASKS")
    raise ConfigError("--shard env: none of SLURM_ARRAY_TASK_ID/COUNT, RANK/WORLD_SIZE, SLURM_PROCID/NTASKS is set")


class StopFlag:
    """SIGTERM, SIGUSR1 (Slurm's warning signals) and SIGINT ask the run to stop at the next batch boundary; a
    second one stops it at once (KeyboardInterrupt), unless ``counts_only``: then every signal is only counted
    (``count``), for a process that passes them on to its workers (``xclip attribute --devices``)."""

    def __init__(self, *, counts_only: bool = False) -> None:
        self.signal: int | None = None
        self.count = 0
        self.counts_only = counts_only

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """The handlers for the duration of a run; the previous ones are restored after it."""
        signals = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]
        previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        self.count += 1
        if self.signal is not None and self.counts_only:
            stderr.print(f"[yellow]signal {signal.Signals(signum).name} again: killing the workers (their written batches are kept)[/]")
            return
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        stderr.print(f"[yellow]signal {signal.Signals(signum).name}: finishing the current batch, then stopping[/]")

    def __call__(self) -> bool:
        return self.signal is not None
