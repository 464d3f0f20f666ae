"""The number of CPU threads: affinity, cgroup quotas (v1 and v2, parents included), Slurm, the user's settings,
and where the CLI and the runner apply it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from xclip.run import runner
from xclip.config import RuntimeConfig, load_config
from xclip.threads import (
    available_cpus,
    cgroup_cpus,
    decide_threads,
    prefer_passive_wait,
    prepare_process,
    threads_for,
    use_threads,
)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture()
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def cgroup_v2(tmp_path: Path, quotas: dict[str, str], own: str = "/job/step") -> dict[str, Path]:
    """A cgroup v2 tree with ``cpu.max`` files at the given paths ("" is the root), and a /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    (root / own.strip("/")).mkdir(parents=True)
    for path, text in quotas.items():
        (root / path / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return {"cgroup_root": root, "proc_cgroup": proc}


def cgroup_v1(tmp_path: Path, quota: str, period: str = "100000", own: str = "/slurm/job") -> dict[str, Path]:
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / own.strip("/")
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (folder / "cpu.cfs_period_us").write_text(period + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"12:memory:/other\n4:cpu,cpuacct:{own}\n0::/\n")
    return {"cgroup_root": root, "proc_cgroup": proc}


def test_the_affinity_mask_is_the_limit_without_quota_or_slurm(tmp_path, eight_cpus):
    paths = cgroup_v2(tmp_path, {"": "max 100000", "job/step": "max 100000"})
    assert cgroup_cpus(paths["cgroup_root"], paths["proc_cgroup"]) is None
    assert decide_threads(environ={}, **paths) == 8


@pytest.mark.parametrize(("quota", "threads"), [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
                                                ("1600000 100000", 8)])
def test_a_v2_quota_caps_the_threads_rounded_up_and_never_above_the_affinity(tmp_path, eight_cpus, quota, threads):
    paths = cgroup_v2(tmp_path, {"job/step": quota})
    assert decide_threads(environ={}, **paths) == threads


def test_the_tightest_quota_of_the_cgroup_and_its_parents_counts(tmp_path, eight_cpus):
    paths = cgroup_v2(tmp_path, {"": "max 100000", "job": "300000 100000", "job/step": "600000 100000"})
    assert cgroup_cpus(paths["cgroup_root"], paths["proc_cgroup"]) == 3.0
    assert decide_threads(environ={}, **paths) == 3


def test_a_container_reads_its_root_when_proc_names_the_hosts_path(tmp_path, eight_cpus):
    paths = cgroup_v2(tmp_path, {"": "400000 100000"}, own="/")
    paths["proc_cgroup"].write_text("0::/kubepods/pod1/container2\n")  # not mounted inside the container
    assert decide_threads(environ={}, **paths) == 4


@pytest.mark.parametrize(("quota", "period", "threads"), [("250000", "100000", 3), ("-1", "100000", 8), ("50000", "50000", 1)])
def test_a_v1_quota_over_its_period(tmp_path, eight_cpus, quota, period, threads):
    paths = cgroup_v1(tmp_path, quota, period)
    assert decide_threads(environ={}, **paths) == threads


def test_unreadable_cgroup_files_are_no_limit(tmp_path, eight_cpus):
    paths = cgroup_v2(tmp_path, {"job/step": "garbage"})
    assert decide_threads(environ={}, **paths) == 8
    assert decide_threads(environ={}, cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none") == 8


def test_slurm_cpus_per_task_caps_the_threads(tmp_path, eight_cpus):
    paths = cgroup_v2(tmp_path, {"job/step": "600000 100000"})
    assert decide_threads(environ={"SLURM_CPUS_PER_TASK": "2"}, **paths) == 2
    assert decide_threads(environ={"SLURM_CPUS_PER_TASK": "16"}, **paths) == 6  # the quota is tighter
    assert decide_threads(environ={"SLURM_CPUS_PER_TASK": "bad"}, **paths) == 6


def test_the_affinity_mask_caps_a_larger_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    paths = cgroup_v2(tmp_path, {"job/step": "400000 100000"})
    assert available_cpus({"SLURM_CPUS_PER_TASK": "4"}, **paths) == 1


def test_runtime_threads_then_omp_num_threads_override_the_cpus(tmp_path, eight_cpus):
    paths = cgroup_v2(tmp_path, {"job/step": "200000 100000"})
    assert decide_threads(5, environ={"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "1"}, **paths) == 5
    assert decide_threads(environ={"OMP_NUM_THREADS": "3"}, **paths) == 3
    assert decide_threads(environ={"OMP_NUM_THREADS": "4,2"}, **paths) == 4  # OpenMP's nested form: the outer level
    assert decide_threads(environ={"OMP_NUM_THREADS": "0"}, **paths) == 2
    assert decide_threads(environ={"OMP_NUM_THREADS": ""}, **paths) == 2


@pytest.mark.parametrize("setting", [{"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "300000"}, {"KMP_BLOCKTIME": "200"}])
def test_a_wait_the_user_chose_is_kept(setting):
    environ = dict(setting)
    assert not prefer_passive_wait(environ)
    assert environ == setting


def test_prepare_process_sets_a_passive_wait_and_the_threads_unless_the_user_did(eight_cpus):
    environ = {"SLURM_CPUS_PER_TASK": "3"}
    assert prepare_process(environ) == 3
    assert environ == {"SLURM_CPUS_PER_TASK": "3", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    environ = {"OMP_NUM_THREADS": "5", "OMP_WAIT_POLICY": "ACTIVE"}
    assert prepare_process(environ) == 5
    assert environ == {"OMP_NUM_THREADS": "5", "OMP_WAIT_POLICY": "ACTIVE"}


def test_the_entry_point_prepares_the_environment_before_torch_loads(tmp_path):
    """torch's thread count comes from the environment main() wrote (the default here would be every CPU)."""
    script = ("import os, sys\nsys.argv = ['xclip', '--version']\nfrom xclip.cli.app import main\n"
              "assert 'torch' not in sys.modules\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
              "import torch\nprint(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                  "KMP_BLOCKTIME", "MKL_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", script], env={**environ, "SLURM_CPUS_PER_TASK": "1"},
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split()[-3:] == ["PASSIVE", "1", "1"]


def test_threads_for_sets_and_restores_torchs_threads():
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with threads_for(other) as threads:
        assert threads == other and torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    try:
        assert use_threads(other) == other and torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)


def test_the_runner_works_under_runtime_threads_and_restores_them(tmp_path, monkeypatch):
    seen = []

    def spy(config, **kwargs):
        seen.append(torch.get_num_threads())
        return SimpleNamespace()

    monkeypatch.setattr(runner, "_run_locked", spy)
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    config = load_config(DEMO_CONFIG, [f"output.directory={tmp_path / 'run'}", f"runtime.threads={other}"])
    runner.run(config)
    assert seen == [other] and torch.get_num_threads() == before


def test_runtime_threads_is_validated_and_not_a_setting_a_resumed_run_must_match(tmp_path):
    assert RuntimeConfig().threads is None
    for bad in (0, -1, "2", 1.5):
        with pytest.raises(ValidationError):
            RuntimeConfig(threads=bad)
    one, four = (load_config(DEMO_CONFIG, [f"output.directory={tmp_path}", f"runtime.threads={n}"]) for n in (1, 4))
    assert one.runtime.threads == 1 and four.runtime.threads == 4
    assert one.result_fingerprint() == four.result_fingerprint() == load_config(
        DEMO_CONFIG, [f"output.directory={tmp_path}"]).result_fingerprint()
