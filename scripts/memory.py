"""A child process's resident memory, sampled while it runs: what the scale scripts report to show that memory
stays flat over a long run (the peak of each tenth of the run, not only the overall peak)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def resident_mib(pid: int) -> float | None:
    """The process's resident memory now (VmRSS), or None once it has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class MemoryTrace:
    seconds: float
    samples: list[tuple[float, float]]  # (seconds since the start, MiB)

    @property
    def peak_mib(self) -> float:
        return round(max((rss for _, rss in self.samples), default=0.0), 1)

    def peak_mib_per_tenth(self) -> list[float | None]:
        tenth = self.seconds / 10
        peaks = [max((rss for t, rss in self.samples if k * tenth <= t < (k + 1) * tenth), default=None) for k in range(10)]
        return [None if peak is None else round(peak, 1) for peak in peaks]


def watch(child: subprocess.Popen, *, stop_after: float | None = None, every: float = 0.5) -> MemoryTrace:
    """Sample ``child``'s memory until it ends; SIGKILL it once ``stop_after`` seconds have passed, when given."""
    start = time.perf_counter()
    samples: list[tuple[float, float]] = []
    while child.poll() is None:
        now = time.perf_counter() - start
        if (rss := resident_mib(child.pid)) is not None:
            samples.append((now, rss))
        if stop_after is not None and now >= stop_after:
            child.kill()
            child.wait()
            break
        time.sleep(every)
    return MemoryTrace(time.perf_counter() - start, samples)
