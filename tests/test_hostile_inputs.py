"""Faults and hostile input: file systems without locks, hostile configs, damaged caches and result files.

Each case is driven the way it was found (a subprocess on a file system whose locks fail, a config a user or an
attacker can write, a file damaged on disk) and asserts the exit code or error and that the message names the
problem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPOSITORY / "configs" / "demo.yaml"
XCLIP = [sys.executable, "-m", "xclip"]
# a flock() that fails as on NFS without a lock daemon, for xclip's lock and for HDF5's alike
NO_LOCKS_SHIM = "#include <errno.h>\nint flock(int fd, int operation) { (void)fd; (void)operation; errno = ENOLCK; return -1; }\n"


def _no_locks_environment(tmp_path: Path) -> dict[str, str]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the flock() shim")
    source, library = tmp_path / "no_locks.c", tmp_path / "no_locks.so"
    source.write_text(NO_LOCKS_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return {**os.environ, "LD_PRELOAD": str(library), "HF_HUB_OFFLINE": "1"}


def test_a_run_and_its_readers_work_where_file_locks_fail_with_enolck(tmp_path: Path) -> None:
    environment = _no_locks_environment(tmp_path)
    probe = "import fcntl, sys; fcntl.flock(sys.stdin.fileno(), fcntl.LOCK_EX)"
    shimmed = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True)
    assert "No locks available" in shimmed.stderr  # the shim is in effect: every flock fails with ENOLCK
    run_dir = tmp_path / "run"
    attribute = [*XCLIP, "attribute", str(DEMO_CONFIG), f"output.directory={run_dir}", "data.limit=3",
                 "attribution.n_steps=2", "attribution.tolerance=null", "-q"]
    first = subprocess.run(attribute, env=environment, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.h5"]  # xclip's O_EXCL fallback record released
    resumed = subprocess.run(attribute, env=environment, capture_output=True, text=True)  # opens run.h5 for writing
    assert resumed.returncode == 0, resumed.stderr
    inspected = subprocess.run([*XCLIP, "inspect", str(run_dir), "--json"], env=environment, capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["counts"]["pairs"] == {"total": 3, "pending": 0, "done": 3, "failed": 0}
