"""The run directory's guarantees: one writer at a time, merges that cannot mix or hide unfinished shards."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from faults import count_writes
from helpers import expect, invoke, jsonl_folder, write_config, write_pipeline_config

from xclip.config import load_config
from xclip.errors import StoreError
from xclip.run.runner import run
from xclip.disk.locking import EXCLUSIVE_LOCK_FILE, LOCK_FILE, writer_lock
from xclip.store import schema
from xclip.store.schema import DONE, PENDING

FAULTS = Path(__file__).resolve().parent / "faults.py"  # runs the command line with fault injection


# --- the writer lock -----------------------------------------------------------------------------------------------
# a live process holding a directory's writer lock as xclip does (flock, then its record written into the file)
HOLD = """
import fcntl, json, os, sys, time
record = json.loads(sys.argv[2])
record.setdefault("pid", os.getpid())
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(descriptor, json.dumps(record).encode())
print("held", flush=True)
time.sleep(120)
"""
# a writer killed by SIGKILL while it holds the lock: its lock file and record stay behind
KILLED = """
import os, signal, sys
from pathlib import Path
from xclip.disk.locking import writer_lock
with writer_lock(Path(sys.argv[1]), "xclip attribute run.yaml"):
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture()
def hold():
    """hold(directory, host=..., slurm_job=...): a live process holds the directory's lock; returns its PID."""
    processes = []

    def hold(directory, host: str | None = None, slurm_job: str = "") -> int:
        directory.mkdir(parents=True, exist_ok=True)
        record = {"host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
                  "command": "xclip attribute other.yaml", "slurm_job": slurm_job}
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / LOCK_FILE), json.dumps(record)], stdout=subprocess.PIPE)
        processes.append(process)
        assert process.stdout.readline() == b"held\n"
        return process.pid

    yield hold
    for process in processes:
        process.kill()
        process.wait()


def kill_while_holding(directory, slurm_job: str = "") -> int:
    env = {**os.environ, "SLURM_JOB_ID": slurm_job}
    process = subprocess.run([sys.executable, "-c", KILLED, str(directory)], env=env, capture_output=True, timeout=120)
    assert process.returncode == -9, process.stderr.decode()
    record = json.loads((directory / LOCK_FILE).read_text())  # left behind, naming the dead writer
    assert record["slurm_job"] == slurm_job
    return record["pid"]


@pytest.fixture()
def config(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    return write_config(tmp_path, model_dirs["clip"])


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, config, hold):
    pid = hold(tmp_path / "run")
    output = expect(["attribute", config], 2, rf"run is being written by process {pid} on {socket.gethostname()} since 2026-01-01T00:00:00\+00:00 \(xclip attribute other.yaml\)")
    assert "XCLIP_DEBUG" not in output  # a second writer is no bug: no traceback to offer
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written


def test_overwrite_never_deletes_a_live_writers_run(tmp_path, config, hold):
    assert invoke("attribute", config, "-q", "output.render=true")[0] == 0
    before = (tmp_path / "run" / "run.h5").read_bytes()
    figures = sorted((tmp_path / "run" / "heatmaps").iterdir())
    pid = hold(tmp_path / "run")
    expect(["attribute", config, "--overwrite", "attribution.n_steps=3"], 2, rf"being written by process {pid}")
    assert (tmp_path / "run" / "run.h5").read_bytes() == before
    assert sorted((tmp_path / "run" / "heatmaps").iterdir()) == figures


def test_a_holder_on_another_host_is_named(tmp_path, config, hold):
    pid = hold(tmp_path / "run", host="node-that-is-not-this-one")
    expect(["attribute", config], 2, rf"being written by process {pid} on node-that-is-not-this-one .* The lock ends with that process")


@pytest.mark.parametrize("slurm_job", ["4242", ""])
def test_a_killed_writers_lock_never_blocks_a_rerun(tmp_path, config, monkeypatch, slurm_job):
    # a requeued Slurm job (same SLURM_JOB_ID, maybe on another node) or a plain rerun after a kill
    dead = kill_while_holding(tmp_path / "run", slurm_job)
    monkeypatch.setenv("SLURM_JOB_ID", slurm_job)
    assert invoke("attribute", config, "-q")[0] == 0
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released after the run
    assert (tmp_path / "run" / "run.h5").is_file()
    assert dead != os.getpid()


def test_a_live_writer_of_the_same_slurm_job_is_refused(tmp_path, config, hold, monkeypatch):
    # two tasks of one job on one directory: the same SLURM_JOB_ID is no licence to take a live lock
    pid = hold(tmp_path / "run", host="node-of-the-other-task", slurm_job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    expect(["attribute", config], 2, rf"being written by process {pid} on node-of-the-other-task")


@pytest.mark.parametrize("content", ["", "{\"pid\": 12", "not json"])
def test_an_empty_or_broken_lock_record_never_blocks(tmp_path, content):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / LOCK_FILE).write_text(content)  # a writer killed between locking and writing its record
    with writer_lock(directory, "xclip attribute"):
        assert json.loads((directory / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (directory / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path, config):
    expect(["attribute", config, "model.name=nobody/no-such-clip"], 1, "not in the Hugging Face cache|must already be in the Hugging Face cache")
    assert not (tmp_path / "run").exists()  # the lock's directory removed again: nothing was written
    data = tmp_path / "images" / "metadata.jsonl"
    data.write_text("1\n")
    expect(["attribute", config], 2, "every record was rejected")
    assert not (tmp_path / "run").exists()


class Writer(threading.Thread):
    """Takes the writer lock with its name as the command, holds it until ``leave`` is set; ``outcome`` is
    "held" or the refusal's message."""

    def __init__(self, directory, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.directory, self.outcome = directory, ""
        self.held, self.leave = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            with writer_lock(self.directory, self.name):
                self.outcome = "held"
                self.held.set()
                assert self.leave.wait(20)
        except StoreError as e:
            self.outcome = str(e)

    def settle(self) -> str:
        """Start (unless started), and wait until it holds the lock or was refused."""
        if self.ident is None:
            self.start()
        while not self.held.wait(0.01) and self.is_alive():
            pass
        return self.outcome

    def finish(self) -> str:
        self.settle()
        self.leave.set()
        self.join(20)
        assert not self.is_alive()
        return self.outcome


@pytest.fixture()
def pause(monkeypatch):
    """pause(thread, step): that thread stops at that step of the lock (opened, locked, releasing) until the
    returned gate's ``go`` is set; ``reached`` says it got there."""
    from xclip.disk import locking

    gates = {}

    def step(name: str) -> None:
        gate = gates.get((threading.current_thread().name, name))
        if gate is not None:
            gate.reached.set()
            assert gate.go.wait(20)

    monkeypatch.setattr(locking, "_lock_step", step)

    def pause(thread: str, step: str) -> SimpleNamespace:
        gates[thread, step] = SimpleNamespace(reached=threading.Event(), go=threading.Event())
        return gates[thread, step]

    return pause


def refused_by(name: str) -> str:
    return rf"is being written by process {os.getpid()} on {re.escape(socket.gethostname())} since \S+ \({name}\)"


def recorded(directory) -> str:
    return json.loads((directory / LOCK_FILE).read_text())["command"]


def paused_writer(directory, name: str, step: str, pause) -> tuple:
    """A writer started and stopped at ``step`` of taking the lock; the gate lets it go on."""
    gate = pause(name, step)
    writer = Writer(directory, name)
    writer.start()
    assert gate.reached.wait(20)
    return writer, gate


def test_a_writer_that_opened_the_lock_file_before_another_locked_it_is_refused(tmp_path, pause):
    directory = tmp_path / "run"
    a, gate = paused_writer(directory, "A", "opened", pause)
    b = Writer(directory, "B")
    assert b.settle() == "held"
    gate.go.set()
    assert re.search(refused_by("B"), a.finish())
    assert b.finish() == "held"
    assert not (directory / LOCK_FILE).exists()


def test_a_writer_that_locked_but_wrote_no_record_yet_still_refuses_others(tmp_path, pause):
    directory = tmp_path / "run"
    a, gate = paused_writer(directory, "A", "locked", pause)
    b = Writer(directory, "B")
    assert "is being written by process" in b.finish()
    gate.go.set()
    assert a.settle() == "held"
    assert recorded(directory) == "A"
    a.finish()


def test_two_writers_after_a_killed_one_one_gets_in(tmp_path, pause):
    # the takeover race of an O_EXCL lock: both read the dead writer's record, both took it over
    directory = tmp_path / "run"
    kill_while_holding(directory)
    gates = {name: pause(name, "opened") for name in "AB"}
    writers = {name: Writer(directory, name) for name in "AB"}
    for name in "AB":
        writers[name].start()
        assert gates[name].reached.wait(20)  # both opened the dead writer's file
    gates["A"].go.set()
    assert writers["A"].settle() == "held"
    gates["B"].go.set()
    assert re.search(refused_by("A"), writers["B"].finish())
    assert recorded(directory) == "A"  # B removed nothing of A's
    writers["A"].finish()
    assert not (directory / LOCK_FILE).exists()


@pytest.mark.parametrize("is_new", [True, False])
def test_a_writer_that_opened_a_lock_file_its_holder_removed_starts_over(tmp_path, pause, is_new):
    directory = tmp_path / "run"
    if not is_new:
        directory.mkdir()
    a = Writer(directory, "A")
    assert a.settle() == "held"
    gate = pause("B", "opened")
    b = Writer(directory, "B")
    b.start()
    assert gate.reached.wait(20)  # B opened A's lock file
    a.finish()  # A removes that file and unlocks it (and its directory, when it made it)
    c = Writer(directory, "C")
    assert c.settle() == "held"  # C locks a new file at the path
    gate.go.set()  # B now locks A's removed file: it must see that the path names another file
    assert re.search(refused_by("C"), b.finish())
    assert recorded(directory) == "C"
    c.finish()


def test_a_releasing_writer_removes_only_its_own_lock_file(tmp_path, pause):
    directory = tmp_path / "run"
    directory.mkdir()
    gate = pause("A", "releasing")
    a = Writer(directory, "A")
    assert a.settle() == "held"
    a.leave.set()
    assert gate.reached.wait(20)  # A is about to remove its lock file
    assert re.search(refused_by("A"), Writer(directory, "B").finish())  # still held
    (directory / LOCK_FILE).unlink()  # deleted by hand, and C takes the lock on a new file
    c = Writer(directory, "C")
    assert c.settle() == "held"
    gate.go.set()
    a.finish()
    assert recorded(directory) == "C"  # A left C's file alone
    assert re.search(refused_by("C"), Writer(directory, "D").finish())
    c.finish()


def test_without_file_locks_an_exclusive_record_is_the_lock(tmp_path, monkeypatch):
    import errno

    from xclip.disk import locking

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_locks)
    directory = tmp_path / "run"
    a = Writer(directory, "A")
    assert a.settle() == "held"
    assert json.loads((directory / EXCLUSIVE_LOCK_FILE).read_text())["command"] == "A"
    assert re.search(refused_by("A") + r".* If that process is gone, delete .*\.writer\.excl", Writer(directory, "B").finish())
    a.finish()
    assert not directory.exists()
    directory.mkdir()
    (directory / EXCLUSIVE_LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "h", "started": "s", "command": "C"}))
    assert "being written by process 1 on h since s (C)" in Writer(directory, "D").finish()  # never taken over


def test_a_run_is_read_by_xclip_and_plain_h5py_at_once_in_one_process(shards):
    # HDF5 refuses a second open of a file in one process with other locking flags ("file locking flag values
    # don't match"): xclip's readers open as plain h5py does, so a notebook can hold both, in either order
    from xclip.store.reader import RunReader

    run_file = shards / "shard-00000-of-00002" / "run.h5"
    with RunReader(run_file.parent) as run, h5py.File(run_file, "r") as plain:
        assert plain["pairs/status"][:].tolist() == run.status("pairs").tolist() == [DONE, DONE]
    with h5py.File(run_file, "r") as plain, RunReader(run_file.parent) as run:
        assert run.interactions(0).shape[1] == plain["pairs/interactions"].shape[2]


# --- merges -------------------------------------------------------------------------------------------------------
@pytest.fixture()
def shards(tmp_path, config):
    """A run of three records split into two finished shards."""
    for shard in ("0/2", "1/2"):
        assert invoke("attribute", config, "-q", "--shard", shard)[0] == 0
    return tmp_path / "run"


@pytest.mark.slow  # two shards and merges
def test_merge_refuses_shards_made_with_other_settings(shards, config):
    assert invoke("attribute", config, "-q", "--shard", "1/2", "--overwrite", "attribution.n_steps=3")[0] == 0
    expect(["merge", shards], 1, r"shard-00001-of-00002/run.h5 was made with other settings than .*shard-00000-of-00002/run.h5 \(attribution.n_steps: 2 -> 3\)")
    assert not (shards / "run.h5").exists()


def test_merge_refuses_unfinished_shards_unless_allowed(shards):
    with h5py.File(shards / "shard-00001-of-00002" / "run.h5", "r+") as f:  # as a shard killed midway leaves it
        f["pairs/status"][0] = PENDING
    expect(["merge", shards], 1, r"unfinished shards .* --allow-partial .*: shard-00001-of-00002: 1 of 1 pairs")
    assert not (shards / "run.h5").exists()
    expect(["merge", shards, "--allow-partial"], 0, r"run.h5")
    with h5py.File(shards / "run.h5", "r") as f:
        assert f.attrs["is_partial"] and f["pairs/status"][:].tolist() == [DONE, DONE, PENDING]


@pytest.mark.slow  # two shards and merges
def test_merge_keeps_an_unrelated_run_byte_identical_unless_overwrite(shards):
    import hashlib

    target = shards / "run.h5"
    shutil.copyfile(shards / "shard-00000-of-00002" / "run.h5", target)  # a finished run that is no merge of them
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    expect(["merge", shards], 2, r"run/run.h5 holds a run of 2 finished pairs of model .* \(not a merge of these shards\); "
                                 r"merging would replace it\. .* pass --overwrite to replace it")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    expect(["merge", shards, "--overwrite"], 0, r"shards: 1/2 shards: 2/2 .*run.h5")  # progress lines in logs
    assert "shards:" not in expect(["merge", shards, "-q"], 0, r"run.h5")
    with h5py.File(target, "r") as f:
        assert len(f["pairs/status"]) == 3
    expect(["merge", shards], 0, r"run.h5")  # an earlier merge of the same shards is merged again
    with h5py.File(shards / "shard-00001-of-00002" / "run.h5", "r+") as f:  # as a rerun of one shard with other data
        f.attrs["data_sha256"] = "0" * 64
    with h5py.File(shards / "shard-00000-of-00002" / "run.h5", "r+") as f:
        f.attrs["data_sha256"] = "0" * 64
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    expect(["merge", shards], 2, r"\(a merge of other shards or settings\)")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


@pytest.mark.slow  # two shards and merges
def test_merge_refuses_shards_of_two_splits(shards, config):
    assert invoke("attribute", config, "-q", "--shard", "0/3")[0] == 0
    expect(["merge", shards], 1, r"holds shards of different splits \(-of-00002, -of-00003\)")


# --- what a rerun resumes ------------------------------------------------------------------------------------------
def test_a_project_moved_whole_resumes_and_renders(tmp_path, model_dirs):
    original = tmp_path / "a"
    jsonl_folder(original, '{"file_name": "img0.png", "text": "a cat"}')
    config = write_config(original, model_dirs["clip"])
    stopped = {"flag": False}

    def stop_after_captions(stage: str, done: int, total: int) -> None:
        stopped["flag"] = stopped["flag"] or stage == "captions"

    summary = run(load_config(config), on_progress=stop_after_captions, should_stop=lambda: stopped["flag"])
    assert summary.is_interrupted and summary.n_done == 0
    moved = tmp_path / "b"
    original.rename(moved)
    code, output = invoke("attribute", moved / "run.yaml", "-q", "--json")
    assert code == 0 and json.loads(output.splitlines()[0])["done"] == 3
    straight = tmp_path / "straight"
    jsonl_folder(straight, '{"file_name": "img0.png", "text": "a cat"}')
    assert invoke("attribute", write_config(straight, model_dirs["clip"]), "-q")[0] == 0
    with h5py.File(moved / "run" / "run.h5", "r") as resumed, h5py.File(straight / "run" / "run.h5", "r") as whole:
        for name in ("pairs/interactions", "pairs/score", "captions/contributions", "images/contributions"):
            np.testing.assert_array_equal(resumed[name][:], whole[name][:])
    expect(["render", moved / "run", "--pair", "0"], 0, r"pair000000.png")  # finds the images where they moved to


def test_edited_data_files_are_detected(tmp_path, config):
    assert invoke("attribute", config, "-q")[0] == 0
    metadata = tmp_path / "images" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("a red dog", "a red fox"))
    expect(["attribute", config], 2, r"the data files changed since .*run was made \(their captions, image paths or pairs differ\)")
    expect(["attribute", config, "--overwrite", "-q"], 0, r"run.h5")
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert "a red fox" in f["captions/text"].asstr()[:]


# --- crash safety -------------------------------------------------------------------------------------------------
RESULTS = ("status", "error", "contributions", "embedding", "reference_embedding", "completeness_error", "n_nodes")


def _results(run_file) -> dict[str, np.ndarray]:
    """Every dataset of a run file (attributes such as the creation time aside, and the images' modification
    times: each trial writes its project's image files anew; their sizes and digests are compared)."""
    out = {}
    with h5py.File(run_file, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    out.pop("images/mtime_ns")
    return out


def _assert_same_results(run_file, reference) -> None:
    got, expected = _results(run_file), _results(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for group in ("captions", "images", "pairs"):
        assert (got[f"{group}/status"] == DONE).all(), group  # nothing missing


def _writes_of_a_run(config) -> int:
    """How many writes an uninterrupted run makes to run.h5 after creating it (counted through the same file
    object the fault injection uses)."""
    def attribute() -> None:
        assert invoke("attribute", config, "-q")[0] == 0

    return count_writes(attribute)


def _killed_at_write(point: int, config) -> list[str]:
    """The command that runs ``xclip attribute config`` killed with SIGKILL inside its ``point``-th write to run.h5."""
    return [sys.executable, str(FAULTS), str(point), "attribute", str(config), "-q"]


def _killed_runs(configs_and_points, parallel: int = 4) -> None:
    """Run ``xclip attribute`` in subprocesses, each killed with SIGKILL inside its N-th write to run.h5."""
    pending = list(configs_and_points)
    running: list = []
    while pending or running:
        while pending and len(running) < parallel:
            config, point = pending.pop(0)
            command = _killed_at_write(point, config)
            running.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), point))
        process, point = running.pop(0)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -9, f"write {point}: exit {process.returncode}: {stderr.decode()[-2000:]}"


def _project(root, model_dirs):
    jsonl_folder(root, '{"file_name": "img0.png", "text": "a cat"}')
    return write_config(root, model_dirs["clip"], runtime={"batch_size": 1})  # a batch, a commit, per item


@pytest.mark.slow  # crash injection: a killed subprocess per write
def test_sigkill_inside_any_write_loses_nothing(tmp_path, model_dirs):
    reference = _project(tmp_path / "reference", model_dirs)
    n_writes = _writes_of_a_run(reference)
    assert n_writes > 50
    # the first and last writes, and evenly between: inside data, inside statuses, inside the final flush
    points = sorted({1, 2, 3, *np.linspace(4, n_writes - 3, 12).astype(int).tolist(), n_writes - 2, n_writes - 1, n_writes})
    trials = [(_project(tmp_path / f"kill-{point}", model_dirs), point) for point in points]
    _killed_runs(trials)
    for config, point in trials:
        code, output = invoke("attribute", config, "-q", "--json")  # the rerun resumes
        assert code == 0, f"rerun after a kill at write {point}: {output}"
        _assert_same_results(config.parent / "run" / "run.h5", reference.parent / "run" / "run.h5")


@pytest.mark.slow  # crash injection: killed subprocesses
def test_runs_killed_again_and_again_end_equal(tmp_path, model_dirs):
    reference = _project(tmp_path / "reference", model_dirs)
    assert invoke("attribute", reference, "-q")[0] == 0
    config = _project(tmp_path / "chain", model_dirs)
    kills = 0
    for point in (7, 13, 29, 41, 53, 67):  # each rerun killed too, at another write, until one finishes
        result = subprocess.run(_killed_at_write(point, config), capture_output=True, timeout=300)
        assert result.returncode in (-9, 0), result.stderr.decode()[-2000:]
        if result.returncode == 0:
            break
        kills += 1
    assert kills >= 3
    assert invoke("attribute", config, "-q")[0] == 0
    _assert_same_results(config.parent / "run" / "run.h5", reference.parent / "run" / "run.h5")


def test_a_run_changes_only_bytes_inside_datasets(tmp_path, model_dirs):
    config = _project(tmp_path, model_dirs)
    summary = run(load_config(config), should_stop=lambda: True)  # creates the file, attributes nothing
    assert summary.n_done == 0
    run_file = tmp_path / "run" / "run.h5"
    created = run_file.read_bytes()
    with h5py.File(run_file, "r") as f:
        ranges = []
        f.visititems(lambda name, obj: ranges.append((obj.id.get_offset(), obj.id.get_storage_size())) if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None else None)
    assert invoke("attribute", config, "-q")[0] == 0
    finished = run_file.read_bytes()
    assert len(finished) == len(created)
    outside = np.ones(len(created), dtype=bool)
    for offset, size in ranges:
        outside[offset : offset + size] = False
    before, after = np.frombuffer(created, np.uint8), np.frombuffer(finished, np.uint8)
    assert (before[outside] == after[outside]).all()  # the structure never changed
    assert (before[~outside] != after[~outside]).any()  # while the results were written


FULL_DISK = r"not enough disk space for {target}: it needs (about )?[\d.]+ MB( \([\d.]+ MB more\))?, and the disk at \S+ has [\d.]+ [MG]B free: {advice}"


def no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def fail_at_call(function, n: int, error: Callable[[], BaseException], then: Callable[[], None] = lambda: None):
    """``function``, failing with ``error()`` at its ``n``-th call (after calling ``then()``)."""
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            then()
            raise error()
        return function(*args, **kwargs)

    return failing


@pytest.mark.parametrize("how", ["free space", *(pytest.param(how, marks=pytest.mark.slow)
                                                 for how in ("ENOSPC reserving", "ENOSPC creating", "HDF5 error on a full disk"))])
def test_a_full_disk_is_found_before_any_work(tmp_path, config, monkeypatch, how):
    import errno

    from xclip.store import create

    assert invoke("attribute", config, "-q", "output.directory=reference")[0] == 0  # a clean run of the same data
    disk_usage = shutil.disk_usage
    is_full = {"now": how == "free space"}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=4096) if is_full["now"] else disk_usage(path))
    if how == "ENOSPC reserving":
        monkeypatch.setattr(os, "posix_fallocate", no_space)
    elif how == "ENOSPC creating":  # HDF5 passes the system's error on
        monkeypatch.setattr(create, "fixed_dataset", fail_at_call(create.fixed_dataset, 10, lambda: OSError(errno.ENOSPC, "Unable to create dataset (file write failed)")))
    elif how == "HDF5 error on a full disk":  # or says something else, without an errno
        monkeypatch.setattr(create, "fixed_dataset", fail_at_call(create.fixed_dataset, 10, lambda: RuntimeError("Unable to create dataset (bad global heap)"), lambda: is_full.update(now=True)))
    expect(["attribute", config], 1, FULL_DISK.format(target=".*run/run.h5", advice="free space, or choose another output.directory, then rerun"))
    assert not (tmp_path / "run").exists()  # no run.h5.tmp, no lock record: the directory the run made is gone
    monkeypatch.undo()  # space freed
    expect(["attribute", config, "-q", "--json"], 0, r'"done": 3')
    _assert_same_results(tmp_path / "run" / "run.h5", tmp_path / "reference" / "run.h5")


def test_the_size_estimated_before_creating_covers_the_file(tmp_path):
    from xclip.store.create import create_run_file
    from xclip.store.schema import RunInputs, Sizes
    from xclip.store.space import declared_bytes, estimated_size

    for n, maps, precision in ((1, False, "float32"), (40, True, "float16"), (300, True, "float64")):
        arguments = dict(
            attributes={"config": {}}, captions=["a caption"] * n, images=["some/image.png"] * n,
            pairs=[(i, i) for i in range(n)], rejected_records=["line 3: bad"], store_pair_maps=maps, precision=precision,
            max_text_positions=77, n_image_positions=50, embedding_dim=64, grid=(7, 7), n_prefix=1,
        )
        path = tmp_path / f"{n}.h5"
        create_run_file(path, **arguments)
        inputs = RunInputs(arguments["captions"], arguments["images"], np.array(arguments["pairs"]), arguments["rejected_records"])
        sizes = Sizes(77, 50, 64)
        with h5py.File(path, "r") as f:  # the declared columns are exactly the fixed-size datasets HDF5 allocated
            allocated = []
            f.visititems(lambda name, obj: allocated.append(obj.id.get_storage_size()) if isinstance(obj, h5py.Dataset) and obj.dtype.kind != "O" else None)
        assert declared_bytes(inputs, sizes, precision, schema.RunKind.of(True, maps)) == sum(allocated)
        size, estimate = path.stat().st_size, estimated_size(inputs, sizes, precision, schema.RunKind.of(True, maps))
        assert size <= estimate <= 1.2 * size + 1.5e6
        with pytest.raises(FileExistsError):  # mode w-: an existing file is refused, and left alone
            create_run_file(path, **arguments)
        assert path.stat().st_size == size


# --- the schema: each column declared once -------------------------------------------------------------------------
def _declared(*, with_maps: bool, given: bool | None = None) -> set[str]:
    """Paths of the declared datasets of a run with or without pair maps (only those ``given`` at creation, or
    only the others)."""
    return {column.name if group == schema.ROOT else f"{group}/{column.name}"
            for group in (*schema.GROUPS, schema.ROOT) for column in schema.columns_of(group, schema.RunKind(stores_pair_maps=with_maps))
            if given is None or given == (column.given is not None)}


@pytest.mark.parametrize("maps", ["store", "none"])
def test_a_run_file_holds_the_declared_columns_and_a_run_writes_them(tmp_path, config, monkeypatch, maps):
    written = set()
    setitem = h5py.Dataset.__setitem__

    def recording(dataset, selection, value):
        written.add(dataset.name.lstrip("/"))
        return setitem(dataset, selection, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", recording)
    assert run(load_config(config, [f"output.pair_maps={maps}"])).n_done == 3
    held = set()
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        f.visititems(lambda name, obj: held.add(name) if isinstance(obj, h5py.Dataset) else None)
    declared = _declared(with_maps=maps == "store")
    assert held - declared == set(), "datasets no column declares"
    assert declared - held == set(), "declared columns the file lacks"
    assert _declared(with_maps=maps == "store", given=False) - written == set(), "declared columns a run never writes"
    assert written & _declared(with_maps=True, given=True) == set(), "columns given at creation, written again during a run"


@pytest.mark.parametrize("maps", ["store", "none"])
def test_a_stored_pair_is_the_map_the_api_gives(tmp_path, config, model_dirs, maps):
    import torch

    import xclip
    from xclip.attribution.result import InteractionMap
    from xclip.errors import ConfigError
    from xclip.store.reader import RunReader

    # the records of the config fixture, as a float64 run of every caption with every image
    every_pair = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"], pairing={"mode": "all"},
                                       output={"directory": "run", "pair_maps": maps})
    assert run(load_config(every_pair)).n_done == 6
    with RunReader(tmp_path / "run") as stored:
        pairs = [stored.pair_inputs(p) for p in range(6)]
        images = [tmp_path / "images" / path for path in stored.image_paths()]
        model = xclip.load_model(model_dirs["clip"], device="cpu", dtype="float64")
        expected = xclip.InteractionAttribution(model, n_steps=6).attribute(stored.captions(), images, pairs=pairs)
        for index, api in enumerate(expected):
            pair = stored.pair(index)
            assert (pair.caption_index, pair.image_index) == (api.caption_index, api.image_index) == pairs[index]
            assert Path(pair.image).resolve() == Path(api.image).resolve()
            for name in ("row_labels", "column_labels", "grid", "n_prefix", "logit_scale", "caption_tokens", "geometry",
                         "is_caption_truncated", "caption"):
                assert getattr(pair, name) == getattr(api, name), name
            assert pair.interactions.dtype == pair.terms.dtype == torch.float64  # a float64 run: as exact as the API
            torch.testing.assert_close(pair.interactions, api.interactions, rtol=0, atol=1e-13)
            torch.testing.assert_close(pair.terms, api.terms, rtol=0, atol=1e-13)
            for name in ("score", "four_term_value", "completeness_error", "completeness_bound", "score_scale",
                         "map_error_bound", "relative_completeness_error"):
                np.testing.assert_allclose(getattr(pair, name), getattr(api, name), rtol=1e-12, atol=1e-13, err_msg=name)
        drawn = stored.pair(0).plot(stored.pair(0).image)
        assert drawn.picture.size[0] > 0
        saved = InteractionMap.load(stored.pair(5).save(tmp_path / "pair5.npz"))
        assert torch.equal(saved.interactions, stored.pair(5).interactions) and saved.caption_index == pairs[5][0]
        with pytest.raises(ConfigError, match=r"pair 6 of .*run.h5 is not one of its pairs"):
            stored.pair(6)
    with h5py.File(tmp_path / "run" / "run.h5", "r+") as f:
        f["pairs/status"][2] = PENDING
    with RunReader(tmp_path / "run") as stored, pytest.raises(ConfigError, match=r"pair 2 of .*run.h5 is pending"):
        stored.pair(2)


@pytest.mark.slow  # two shards and merges
@pytest.mark.parametrize("how", ["free space", "ENOSPC writing"])
def test_a_full_disk_while_merging_is_one_message_and_leaves_nothing(shards, monkeypatch, how):

    if how == "free space":
        disk_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=4096))
    else:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", fail_at_call(h5py.Dataset.__setitem__, 20, lambda: no_space()))
    expect(["merge", shards], 1, FULL_DISK.format(target=".*run/run.h5", advice="free space, then merge again"))
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]  # no temporary
    monkeypatch.undo()
    expect(["merge", shards], 0, r"run.h5")
    with h5py.File(shards / "run.h5", "r") as f:
        assert (f["pairs/status"][:] == DONE).all() and len(f["pairs/status"]) == 3


def fsyncs_and_renames(monkeypatch) -> list[tuple]:
    """Records ("fsync", inode, is a directory) and ("replace", source, target) in order."""
    import stat

    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        status = os.fstat(descriptor)
        events.append(("fsync", status.st_ino, stat.S_ISDIR(status.st_mode)))
        return fsync(descriptor)

    def recording_replace(source, target, **kwargs):
        events.append(("replace", os.fspath(source), os.fspath(target)))
        return replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def assert_synced_around_the_rename(events: list[tuple], target) -> None:
    """The file reached the disk before its rename to ``target``, the directory's entry after it."""
    renames = [k for k, event in enumerate(events) if event[0] == "replace" and event[2] == str(target)]
    assert len(renames) == 1, events
    file, folder = os.stat(target).st_ino, os.stat(target.parent).st_ino
    assert ("fsync", file, False) in events[: renames[0]], events
    assert ("fsync", folder, True) in events[renames[0] :], events


def test_the_run_file_is_synced_before_and_after_its_rename(tmp_path, config, monkeypatch):
    events = fsyncs_and_renames(monkeypatch)
    run(load_config(config), should_stop=lambda: True)  # creates the file, attributes nothing
    assert_synced_around_the_rename(events, tmp_path / "run" / "run.h5")


def test_the_merged_file_is_synced_before_and_after_its_rename(shards, monkeypatch):
    from xclip.store.merge import merge_shards

    events = fsyncs_and_renames(monkeypatch)
    merge_shards(shards)
    assert_synced_around_the_rename(events, shards / "run.h5")


def test_overwrite_deletes_only_what_xclip_wrote(tmp_path, config):
    from PIL import Image

    run_dir = tmp_path / "run"
    figures = run_dir / "heatmaps"
    assert invoke("attribute", config, "-q", "output.render=true")[0] == 0
    drawn = sorted(p.name for p in figures.iterdir())
    assert drawn == ["pair000000.png", "pair000001.png", "pair000002.png"]
    # the user's own files, one named as xclip names figures but not drawn by it, and a killed run's leftovers
    Image.new("RGB", (4, 4)).save(figures / "figure1.png")
    Image.new("RGB", (4, 4)).save(figures / "pair000099.png")
    (figures / "notes.txt").write_text("mine")
    (run_dir / "notes.txt").write_text("mine too")
    (run_dir / "run.h5.tmp").write_bytes(b"a killed run's file")
    (figures / ".pair000001.png.tmp-123-0a1b2c3d").write_bytes(b"half a figure")
    assert invoke("attribute", config, "-q", "--overwrite", "attribution.n_steps=3")[0] == 0
    assert sorted(p.name for p in figures.iterdir()) == ["figure1.png", "notes.txt", "pair000099.png"]
    assert (run_dir / "notes.txt").read_text() == "mine too"
    assert not (run_dir / "run.h5.tmp").exists()
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert json.loads(f.attrs["config"])["attribution"]["n_steps"] == 3
    for name in ("figure1.png", "notes.txt", "pair000099.png"):
        (figures / name).unlink()
    assert invoke("render", run_dir)[0] == 0
    assert invoke("attribute", config, "-q", "--overwrite")[0] == 0
    assert not figures.exists()  # only xclip's figures were in it


def half_then(error: Callable[[], BaseException]):
    """A Pillow save that writes half of the figure's bytes, then fails with ``error()``."""
    import io

    from PIL import Image

    save = Image.Image.save

    def half(self, target, *args, **kwargs):
        buffer = io.BytesIO()
        save(self, buffer, *args, **kwargs)
        with open(target, "wb") as stream:
            stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error()

    return half


@pytest.mark.slow  # a run and two renders
def test_a_full_disk_while_rendering_is_one_message_and_leaves_nothing(tmp_path, config, monkeypatch):
    from PIL import Image

    run_dir = tmp_path / "run"
    assert invoke("attribute", config, "-q")[0] == 0
    assert invoke("render", run_dir, "--out", tmp_path / "clean")[0] == 0
    monkeypatch.setattr(Image.Image, "save", half_then(no_space))
    expect(["render", run_dir], 1, r"not enough disk space for .*run/heatmaps/pair000000.png: the disk at \S+ has [\d.]+ [MG]B "
                                   r"free: free space, or choose another output folder, then rerun")
    assert not (run_dir / "heatmaps").exists()  # the folder it made, and no partial figure
    monkeypatch.undo()  # space freed
    assert invoke("render", run_dir)[0] == 0
    clean = sorted((tmp_path / "clean").iterdir())
    assert [p.name for p in sorted((run_dir / "heatmaps").iterdir())] == [p.name for p in clean]
    for path in clean:
        assert (run_dir / "heatmaps" / path.name).read_bytes() == path.read_bytes()


def test_a_figure_that_fails_while_written_never_lies_half_written_under_its_name(tmp_path, config, monkeypatch):
    from PIL import Image

    run_dir = tmp_path / "run"
    assert invoke("attribute", config, "-q", "output.render=true")[0] == 0
    before = {p.name: p.read_bytes() for p in (run_dir / "heatmaps").iterdir()}
    monkeypatch.setattr(Image.Image, "save", half_then(lambda: RuntimeError("the encoder broke")))
    with pytest.raises(RuntimeError, match="the encoder broke"):
        from xclip.show.render import render_run

        render_run(run_dir)
    assert {p.name: p.read_bytes() for p in (run_dir / "heatmaps").iterdir()} == before  # the old figures, whole


@pytest.mark.slow  # crash injection: a killed subprocess
def test_a_render_killed_while_writing_a_figure_leaves_no_half_figure(tmp_path, config):
    from xclip.store.directory import is_xclip_figure

    run_dir = tmp_path / "run"
    assert invoke("attribute", config, "-q")[0] == 0
    killed = (
        "import os, signal, sys\n"
        "from PIL import Image\n"
        "save = Image.Image.save\n"
        "def half(self, target, *args, **kwargs):\n"
        "    import io\n"
        "    buffer = io.BytesIO()\n"
        "    save(self, buffer, *args, **kwargs)\n"
        "    with open(target, 'wb') as stream:\n"
        "        stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])\n"
        "        stream.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "Image.Image.save = half\n"
        "from xclip.show.render import render_run\n"
        "render_run(sys.argv[1])\n"
    )
    process = subprocess.run([sys.executable, "-c", killed, str(run_dir)], capture_output=True, timeout=300)
    assert process.returncode == -9, process.stderr.decode()
    left = list((run_dir / "heatmaps").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".pair000000.png.tmp-")  # the half figure, under a temporary name
    assert is_xclip_figure(left[0])  # which --overwrite knows as xclip's
    assert invoke("attribute", config, "-q", "--overwrite")[0] == 0
    assert not (run_dir / "heatmaps").exists()


# --- maps on demand -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two runs of the demo model
def test_runs_without_stored_maps_read_the_same(tmp_path):
    from helpers import DEMO_MODEL, DEMO_SCENES
    from PIL import Image

    from xclip.store.reader import RunReader

    images = tmp_path / "images"
    images.mkdir()
    records = [json.loads(line) for line in (DEMO_SCENES / "annotations.jsonl").read_text().splitlines()][:4]
    for record in records:
        shutil.copy(DEMO_SCENES / record["image"], images / record["image"])
    (images / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["image"], "text": r["caption"]}) + "\n" for r in records))
    (tmp_path / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    outputs = {}
    for maps in ("store", "none"):
        config = write_config(tmp_path, str(DEMO_MODEL), output={"directory": maps, "pair_maps": maps}, pairing={"mode": "all"})
        assert invoke("attribute", config, "-q")[0] == 0
        run_dir = tmp_path / maps
        with RunReader(run_dir) as run:
            assert run.has_pair_maps == (maps == "store")
            maps_read = [run.interactions(p) for p in range(16)]
        report = json.loads(invoke("inspect", run_dir, "--json")[1])
        for key in ("file", "config", "created"):
            report.pop(key)
        assert invoke("render", run_dir, "--pair", "5")[0] == invoke("render", run_dir, "--pair", "5", "--span", "blue")[0] == 0
        figures = {png.name: Image.open(png) for png in sorted((run_dir / "heatmaps").glob("*.png"))}
        assert invoke("evaluate", run_dir, "-a", tmp_path / "annotations.jsonl", "--out", tmp_path / f"evaluation-{maps}")[0] == 0
        evaluation = json.loads((tmp_path / f"evaluation-{maps}" / "report.json").read_text())
        outputs[maps] = (maps_read, report, figures, evaluation)
    stored, computed = outputs["store"], outputs["none"]
    for a, b in zip(stored[0], computed[0]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)  # the same map, to float32 precision
    # inspect reads the stored numbers: the same scores; completeness errors from summed contributions
    # instead of summed maps differ by float32 rounding only
    assert _close(stored[1], computed[1], absolute=1e-6)
    assert stored[2].keys() == computed[2].keys() and len(stored[2]) == 2
    for name, figure in stored[2].items():
        other = computed[2][name]
        assert abs(float(figure.text["xclip:halfrange"]) - float(other.text["xclip:halfrange"])) <= 1e-6 * float(figure.text["xclip:halfrange"])
        assert np.abs(np.asarray(figure, dtype=int) - np.asarray(other, dtype=int)).max() <= 1
    assert _close(stored[3], computed[3])
    assert (tmp_path / "none" / "run.h5").stat().st_size < (tmp_path / "store" / "run.h5").stat().st_size


def _close(a, b, absolute: float = 1e-7) -> bool:
    """Two JSON reports equal, numbers to a relative 1e-5 (or ``absolute``)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], absolute) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, absolute) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-5, abs=absolute)
    return a == b


@pytest.mark.parametrize("mode", ["given", "all", "topk"])
def test_limit_cuts_the_pairs_and_the_inputs_they_need(tmp_path, config, mode):
    code, output = invoke("attribute", config, "data.limit=2", f"pairing.mode={mode}", "pairing.k=1", "-q", "--json")
    assert code == 0 and json.loads(output.splitlines()[0])["pairs"] == 2
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        pairs = list(zip(f["pairs/caption_index"][:], f["pairs/image_index"][:]))
        assert len(pairs) == 2
        assert len(f["captions/text"]) == len({c for c, _ in pairs}) and len(f["images/path"]) == len({i for _, i in pairs})


def test_float16_storage_halves_the_arrays_and_keeps_the_maps(tmp_path, config):
    assert invoke("attribute", config, "-q", "output.directory=full", "output.pair_maps=store")[0] == 0
    assert invoke("attribute", config, "-q", "output.directory=half", "output.pair_maps=store", "output.precision=float16")[0] == 0
    with h5py.File(tmp_path / "half" / "run.h5", "r") as f:
        assert f["captions/contributions"].dtype == f["pairs/interactions"].dtype == np.float16
        assert f["captions/embedding"].dtype == f["pairs/score"].dtype == np.float32  # numbers stay float32
    from xclip.store.reader import RunReader

    with RunReader(tmp_path / "full") as full, RunReader(tmp_path / "half") as half:
        np.testing.assert_array_equal(full.column("pairs", "score"), half.column("pairs", "score"))
        for pair in range(3):
            a, b = full.interactions(pair), half.interactions(pair)
            assert b.dtype == np.float32 and np.abs(a - b).max() <= 2e-3 * np.abs(a).max()
    with h5py.File(tmp_path / "full" / "run.h5", "r") as full, h5py.File(tmp_path / "half" / "run.h5", "r") as half:
        for name in ("captions/contributions", "images/contributions", "pairs/interactions"):
            assert 2 * half[name].id.get_storage_size() == full[name].id.get_storage_size()


def test_shards_share_one_topk_ranking(tmp_path, config, monkeypatch):
    config_topk = ["pairing.mode=topk", "pairing.k=1"]
    assert invoke("attribute", config, "-q", "output.directory=whole", *config_topk)[0] == 0
    assert invoke("attribute", config, "-q", "--shard", "0/2", *config_topk)[0] == 0
    assert len(list((tmp_path / "run").glob(".topk-ranking-*.npy"))) == 1

    def no_second_ranking(*args, **kwargs):
        raise AssertionError("the second shard ranked again")

    monkeypatch.setattr("xclip.run.pairing._similarities", no_second_ranking)
    assert invoke("attribute", config, "-q", "--shard", "1/2", *config_topk)[0] == 0
    expect(["merge", tmp_path / "run"], 0, "run.h5")
    merged, whole = (_named_pairs(tmp_path / name / "run.h5") for name in ("run", "whole"))
    assert merged == whole and len(whole) == 2


def _named_pairs(run_file) -> list[tuple[str, str]]:
    with h5py.File(run_file, "r") as f:
        captions, images = f["captions/text"].asstr()[:], f["images/path"].asstr()[:]
        return sorted(zip(captions[f["pairs/caption_index"][:]], images[f["pairs/image_index"][:]]))


def test_a_failed_background_write_surfaces_and_keeps_the_batches_before_it(tmp_path, model_dirs, monkeypatch):
    import errno

    from xclip.store.reader import RunReader
    from xclip.store.writer import RunWriter

    config = _project(tmp_path, model_dirs)  # one image per batch: each batch written in the background
    write_images, calls = RunWriter.write_images, []

    def failing_second_write(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error (injected)")
        write_images(self, *args)

    monkeypatch.setattr(RunWriter, "write_images", failing_second_write)
    with pytest.raises(OSError, match="injected"):  # raised in the writer thread, surfaced to the run's caller
        run(load_config(config))
    with RunReader(tmp_path / "run") as stored:
        assert (stored.status("captions") == DONE).all()
        assert stored.status("images").tolist() == [DONE, PENDING]
    monkeypatch.undo()
    assert run(load_config(config)).n_done == 3


@pytest.mark.parametrize(("precision", "maps"), [("float32", False), ("float32", True), ("float16", True)])
def test_bytes_per_item_counts_every_row_of_the_layout(tmp_path, precision, maps):
    from xclip.store.create import create_run_file
    from xclip.store.reader import RunReader

    L, S, E = 5, 3, 4  # noqa: N806  (text positions, image positions, embedding size)
    create_run_file(
        tmp_path / "run.h5", attributes={"config": {}}, captions=["a", "b"], images=["x.png"], pairs=[(0, 0), (1, 0)],
        rejected_records=[], store_pair_maps=maps, precision=precision, max_text_positions=L, n_image_positions=S,
        embedding_dim=E, grid=(1, 2), n_prefix=1,
    )
    array = 2 if precision == "float16" else 4
    # status, error, embedding and reference embedding, 3 float errors, n_nodes, n_endpoints, the map error
    # bound, is_converged, checksum, contributions
    inputs = 1 + 400 + 2 * E * 4 + 3 * 4 + 4 + 4 + 4 + 1 + 4
    # + token ids, tokens, offsets, special and unknown flags, n_positions, is_truncated
    caption = inputs + L * array * E + L * 4 + L * 48 + L * 8 + 2 * L + 4 + 1
    # + original size, preprocessing, notes, the file's sha256, size and modification time
    image = inputs + S * array * E + 2 * 4 + 10 * 8 + 200 + 64 + 8 + 8
    pair = 1 + 100 + 2 * 8 + 10 * 4 + 4 + (L * S * array if maps else 0)  # status, error, indices, 10 floats, checksum, map
    with RunReader(tmp_path) as stored:
        assert [stored.bytes_per_item(g) for g in ("captions", "images", "pairs")] == [caption, image, pair]


def test_values_and_finished_columns_read_rows_as_asked(tmp_path):
    from xclip.store.create import create_run_file
    from xclip.store.reader import RunReader
    from xclip.store.schema import FAILED

    create_run_file(
        tmp_path / "run.h5", attributes={"config": {}}, captions=["a", "b", "c"], images=["x.png"],
        pairs=[(0, 0), (1, 0), (2, 0)], rejected_records=[], store_pair_maps=False, precision="float32",
        max_text_positions=5, n_image_positions=3, embedding_dim=4, grid=(1, 2), n_prefix=1,
    )
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f["pairs/score"][:] = [0.5, 0.25, 0.75]
        f["pairs/status"][:] = [DONE, PENDING, FAILED]
        f["pairs/error"][2] = "why"
    with RunReader(tmp_path) as stored:
        assert stored.values("pairs", "score", [2, 0, 2]).tolist() == [0.75, 0.5, 0.75]  # the order asked, repeats too
        assert stored.values("pairs", "score", []).tolist() == []
        assert stored.errors("pairs", [2, 0, 2]) == ["why", "", "why"]
        score = stored.finished_columns("pairs", ["score"])["score"]
        assert score.dtype == np.float64
        assert score[0] == 0.5
        assert np.isnan(score[1:]).all()  # not done: NaN, whatever the file holds
        assert stored.finished_columns("pairs", ["score"], np.full(3, DONE))["score"].tolist() == [0.5, 0.25, 0.75]
