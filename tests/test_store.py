"""The run directory's guarantees: one writer at a time, merges that cannot mix or hide unfinished shards."""

from __future__ import annotations

import json
import os
import shutil
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


def hold(directory, pid: int, host: str | None = None, slurm_job: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
              "command": "xclip attribute other.yaml", "slurm_job": slurm_job}
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


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, config, monkeypatch):
    hold(tmp_path / "run", 1, host="node-of-the-first-attempt", slurm_job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused
    expect(["attribute", config], 1, r"being written by process 1 on node-of-the-first-attempt")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto another node
    assert invoke("attribute", config, "-q")[0] == 0


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


# --- crash safety -------------------------------------------------------------------------------------------------
RESULTS = ("status", "error", "contributions", "embedding", "reference_embedding", "completeness_error", "n_nodes")


def _results(run_file) -> dict[str, np.ndarray]:
    """Every dataset of a run file (attributes such as the creation time aside)."""
    out = {}
    with h5py.File(run_file, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
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
    from xclip import store

    count = {"writes": 0}
    original = store._KillingFile.write

    def counting(self, data):
        count["writes"] += 1
        return original(self, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XCLIP_TEST_KILL_AT_WRITE", str(10**9))
        patch.setattr(store._KillingFile, "write", counting)
        assert invoke("attribute", config, "-q")[0] == 0
    return count["writes"]


def _killed_runs(configs_and_points, parallel: int = 4) -> None:
    """Run ``xclip attribute`` in subprocesses, each killed with SIGKILL inside its N-th write to run.h5."""
    pending = list(configs_and_points)
    running: list = []
    while pending or running:
        while pending and len(running) < parallel:
            config, point = pending.pop(0)
            env = {**os.environ, "XCLIP_TEST_KILL_AT_WRITE": str(point)}
            command = [sys.executable, "-m", "xclip", "attribute", str(config), "-q"]
            running.append((subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), point))
        process, point = running.pop(0)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -9, f"write {point}: exit {process.returncode}: {stderr.decode()[-2000:]}"


def _project(root, model_dirs):
    jsonl_folder(root, '{"file_name": "img0.png", "text": "a cat"}')
    return write_config(root, model_dirs["clip"], runtime={"batch_size": 1})  # a batch, a commit, per item


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


def test_runs_killed_again_and_again_end_equal(tmp_path, model_dirs):
    reference = _project(tmp_path / "reference", model_dirs)
    assert invoke("attribute", reference, "-q")[0] == 0
    config = _project(tmp_path / "chain", model_dirs)
    kills = 0
    for point in (7, 13, 29, 41, 53, 67):  # each rerun killed too, at another write, until one finishes
        env = {**os.environ, "XCLIP_TEST_KILL_AT_WRITE": str(point)}
        result = subprocess.run([sys.executable, "-m", "xclip", "attribute", str(config), "-q"], env=env, capture_output=True, timeout=300)
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


@pytest.mark.parametrize("how", ["free space", "ENOSPC"])
def test_a_full_disk_is_found_before_any_work(tmp_path, config, monkeypatch, how):
    import errno

    from xclip import store

    if how == "free space":
        disk_usage = shutil.disk_usage
        monkeypatch.setattr(store.shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=1000))
    else:
        def no_space(descriptor, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store.os, "posix_fallocate", no_space)
    expect(["attribute", config], 1, r"not enough disk space for .*run/run.h5: it needs [\d.]+ MB \([\d.]+ MB more\), and the disk at \S+ has [\d.]+ [MG]B free")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    monkeypatch.undo()  # space freed
    expect(["attribute", config, "-q", "--json"], 0, r'"done": 3')


# --- maps on demand -------------------------------------------------------------------------------------------------
def test_runs_without_stored_maps_read_the_same(tmp_path):
    from conftest import DEMO_MODEL, DEMO_SCENES
    from PIL import Image

    from xclip.store import RunReader

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
    from xclip.store import RunReader

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

    monkeypatch.setattr("xclip.pairing._similarities", no_second_ranking)
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

    from xclip.store import RunReader, RunWriter

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
    from xclip.store import RunReader, create_run_file

    L, S, E = 5, 3, 4  # noqa: N806  (text positions, image positions, embedding size)
    create_run_file(
        tmp_path / "run.h5", attributes={"config": {}}, captions=["a", "b"], images=["x.png"], pairs=[(0, 0), (1, 0)],
        rejected_records=[], store_pair_maps=maps, precision=precision, max_text_positions=L, n_image_positions=S,
        embedding_dim=E, grid=(1, 2), n_prefix=1,
    )
    array = 2 if precision == "float16" else 4
    # status, error, embedding and reference embedding, 3 float errors, n_nodes, is_converged, contributions
    inputs = 1 + 400 + 2 * E * 4 + 3 * 4 + 4 + 1
    # + token ids, tokens, offsets, special and unknown flags, n_positions, is_truncated
    caption = inputs + L * array * E + L * 4 + L * 48 + L * 8 + 2 * L + 4 + 1
    image = inputs + S * array * E + 2 * 4 + 10 * 8 + 200  # + original size, preprocessing, notes
    pair = 1 + 100 + 2 * 8 + 9 * 4 + (L * S * array if maps else 0)  # status, error, indices, 9 floats, the map
    with RunReader(tmp_path) as stored:
        assert [stored.bytes_per_item(g) for g in ("captions", "images", "pairs")] == [caption, image, pair]
