"""CPU threads sized to the CPUs this process may use, and OpenMP's passive wait.

torch starts one intra-op thread per CPU it sees and OpenMP's default lets a waiting thread spin for about 3 ms
before it sleeps. On a node shared with other work, or in a container whose CPU quota is below the host's CPU
count, those threads spin while the thread they wait for is descheduled: xclip's many small operations then take
several times the CPU time and wall time they take alone. :func:`decide_threads` counts the CPUs the process may
use; :func:`use_threads` gives torch that many threads; :func:`prefer_passive_wait` makes OpenMP's threads sleep
instead of spinning, and must run before torch is imported (the CLI's entry point calls it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# a user's own wait setting (libgomp's spin count, Intel OpenMP's block time) is kept
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def affinity_cpus() -> int:
    """CPUs in the process's affinity mask (``taskset``, Slurm's binding, a cpuset), or every CPU where the
    platform has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _quota(file: Path) -> float | None:
    """CPUs a cgroup's quota file allows; None when it is absent, unlimited or unreadable."""
    try:
        if file.name == "cpu.max":  # v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = file.read_text().split()[:2]
        else:  # v1: cpu.cfs_quota_us (-1: unlimited) beside cpu.cfs_period_us
            quota, period = file.read_text().strip(), (file.parent / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _own_and_parents(hierarchy: Path, path: str) -> list[Path]:
    """A cgroup's directory and its parents up to the hierarchy's root; only the root when the path is not
    mounted here (a container sees its own cgroup as the root while /proc may name the host's path)."""
    directory = hierarchy / path.strip().strip("/")
    if not directory.is_dir():
        return [hierarchy]
    return [directory, *(parent for parent in directory.parents if parent == hierarchy or hierarchy in parent.parents)]


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU time per second the process's cgroups allow: the tightest quota of its cgroup and every parent
    (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None without a quota."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy id : controllers (empty for v2) : path
        if len(fields) != 3:
            continue
        if fields[1] == "":
            hierarchy, name = root, "cpu.max"
        elif "cpu" in fields[1].split(","):
            hierarchy, name = root / fields[1], "cpu.cfs_quota_us"
            hierarchy = hierarchy if hierarchy.is_dir() else root / "cpu"  # cpu,cpuacct is often linked as cpu
        else:
            continue
        quotas += [_quota(directory / name) for directory in _own_and_parents(hierarchy, fields[2])]
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _positive_int(text: str | None) -> int | None:
    """The first number of an environment value such as ``4`` or OpenMP's nested ``4,2``; None if not positive."""
    try:
        number = int((text or "").split(",")[0])
    except ValueError:
        return None
    return number if number > 0 else None


def available_cpus(environ: Mapping[str, str] | None = None, *, cgroup_root: Path = CGROUP_ROOT,
                   proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may use: the fewest of its affinity mask, its cgroup CPU quota (rounded up) and
    Slurm's ``SLURM_CPUS_PER_TASK``; at least 1."""
    environ = os.environ if environ is None else environ
    limits = [affinity_cpus()]
    quota = cgroup_cpus(cgroup_root, proc_cgroup)
    if quota is not None:
        limits.append(math.ceil(quota))
    slurm = _positive_int(environ.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None:
        limits.append(slurm)
    return max(1, min(limits))


def decide_threads(setting: int | None = None, *, environ: Mapping[str, str] | None = None,
                   cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """How many intra-op threads torch should use.

    Args:
        setting: ``runtime.threads``: taken as given when set.

    Returns:
        ``setting``; else ``OMP_NUM_THREADS`` where the user set it; else :func:`available_cpus`.
    """
    if setting is not None:
        return setting
    environ = os.environ if environ is None else environ
    chosen = _positive_int(environ.get("OMP_NUM_THREADS"))
    return chosen or available_cpus(environ, cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)


def prefer_passive_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a wait (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or
    ``KMP_BLOCKTIME`` set). OpenMP reads it once, when torch is imported: call this before.

    Returns:
        Whether the policy was set.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in WAIT_SETTINGS):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def prepare_process(environ: MutableMapping[str, str] | None = None) -> int:
    """Before torch is imported: :func:`prefer_passive_wait`, and ``OMP_NUM_THREADS`` set to
    :func:`decide_threads` unless the user set it (torch, MKL and OpenMP all read it when torch loads; child
    processes inherit both). The CLI's entry point calls this; the number of threads.
    """
    environ = os.environ if environ is None else environ
    prefer_passive_wait(environ)
    threads = decide_threads(environ=environ)
    environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads


def use_threads(setting: int | None = None) -> int:
    """Give torch :func:`decide_threads`' number of intra-op threads, for the whole process; the number."""
    import torch

    threads = decide_threads(setting)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@contextmanager
def threads_for(setting: int | None = None) -> Iterator[int]:
    """:func:`use_threads` for the duration of the block; torch's previous number is restored after it."""
    import torch

    previous = torch.get_num_threads()
    try:
        yield use_threads(setting)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
