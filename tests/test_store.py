"""The run directory's guarantees: one writer at a time, merges that cannot mix or hide unfinished shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_bad_inputs import expect, invoke, jsonl_folder, write_config

from xclip.config import load_config
from xclip.errors import StoreError
from xclip.runner import run
from xclip.store import DONE, LOCK_FILE, PENDING, writer_lock


@pytest.fixture()
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def hold(directory, pid: int, host: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "command": "xclip attribute other.yaml"}
    (directory / LOCK_FILE).write_text(json.dumps(holder))


@pytest.fixture()
def config(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    return write_config(tmp_path, model_dirs["clip"])


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, config, live_process):
    hold(tmp_path / "run", live_process.pid)
    expect(["attribute", config], 1, rf"run is being written by process {live_process.pid} on {socket.gethostname()} since 2026-01-01T00:00:00\+00:00 \(xclip attribute other.yaml\)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written


def test_overwrite_never_deletes_a_live_writers_run(tmp_path, config, live_process):
    assert invoke("attribute", config, "-q")[0] == 0
    before = (tmp_path / "run" / "run.h5").read_bytes()
    hold(tmp_path / "run", live_process.pid)
    expect(["attribute", config, "--overwrite", "attribution.n_steps=3"], 1, rf"being written by process {live_process.pid}")
    assert (tmp_path / "run" / "run.h5").read_bytes() == before


def test_a_lock_of_another_host_is_respected(tmp_path, config):
    hold(tmp_path / "run", 1, host="node-that-is-not-this-one")
    expect(["attribute", config], 1, r"being written by process 1 on node-that-is-not-this-one .* If that process is gone, delete .*\.writer\.lock")


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, config):
    hold(tmp_path / "run", dead_pid())
    assert invoke("attribute", config, "-q")[0] == 0
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released after the run
    assert (tmp_path / "run" / "run.h5").is_file()


def test_an_empty_lock_file_is_stale_only_when_old(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / LOCK_FILE).write_text("")  # a writer killed between creating and writing its lock
    with pytest.raises(StoreError, match="being written by process"):
        with writer_lock(directory):
            pass
    os.utime(directory / LOCK_FILE, (0, 0))
    with writer_lock(directory):
        assert json.loads((directory / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_released_when_the_run_fails(tmp_path, config):
    expect(["attribute", config, "model.name=nobody/no-such-clip"], 1, "not in the Hugging Face cache|must already be in the Hugging Face cache")
    assert not (tmp_path / "run").exists()  # the lock's directory removed again: nothing was written
    data = tmp_path / "images" / "metadata.jsonl"
    data.write_text("1\n")
    expect(["attribute", config], 2, "every record was rejected")
    assert not (tmp_path / "run").exists()


# --- merges -------------------------------------------------------------------------------------------------------
@pytest.fixture()
def shards(tmp_path, config):
    """A run of three records split into two finished shards."""
    for shard in ("0/2", "1/2"):
        assert invoke("attribute", config, "-q", "--shard", shard)[0] == 0
    return tmp_path / "run"


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
