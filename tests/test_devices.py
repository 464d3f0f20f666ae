"""One run over several worker processes (`xclip attribute --devices`, and the shard plan that
scripts/ray_attribute.py runs as Ray tasks): the same pairs and the same numbers as one process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import expect, invoke, json_line, make_images, write_pipeline_config

from xclip.config import load_config
from xclip.disk.locking import writer_lock
from xclip.errors import ConfigError
from xclip.run.runner import run
from xclip.run.workers import (
    ShardTask,
    attribute_arguments,
    combined_exit_code,
    needs_rerun,
    outcome_of,
    parse_devices,
    plan_shards,
    worker_threads,
)
from xclip.store.merge import merge_shards

N_PAIRS = 32
SLOW_WRITES = Path(__file__).resolve().parent / "slow_writes"  # its sitecustomize slows every run-file write


def write_run(root: Path, model_dir: str) -> Path:
    """32 images, each with a caption of its own (given pairs), attributed in batches of two on one thread."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for i, image in enumerate(make_images(N_PAIRS, seed=5)):
        image.save(images / f"img{i:03d}.png")
        lines.append(json.dumps({"file_name": f"img{i:03d}.png", "text": f"{['a red dog', 'two blue circles'][i % 2]} {i}"}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    # one thread in every process, and batches of two that two shards of 16 pairs split alike: each sum is then taken
    # in the same order, and the numbers are equal to the bit
    return write_pipeline_config(root / "run.yaml", model_dir, attribution={"n_steps": 10}, runtime={"batch_size": 2, "threads": 1})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_dirs) -> tuple[Path, Path]:
    """The run config and its run by one process (``ROOT/one/run.h5``)."""
    root = tmp_path_factory.mktemp("devices")
    config = write_run(root, model_dirs["clip"])
    run(load_config(config, ["output.directory=one"]))
    return config, root / "one" / "run.h5"


def assert_same_run(whole: Path, merged: Path, *, atol: float = 0.0) -> None:
    """The same pairs in the same order (by caption text and image path), the same statuses and nodes, and every
    number of every pair and of every input equal to the bit, or within ``atol``."""

    def assert_equal(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
        if atol and expected.dtype.kind == "f":
            np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=name)

    with h5py.File(whole, "r") as one, h5py.File(merged, "r") as many:
        assert len(many["pairs/status"]) == len(one["pairs/status"]) == N_PAIRS
        for side, name in (("caption", "captions/text"), ("image", "images/path")):
            assert list(many[name].asstr()[:][many[f"pairs/{side}_index"][:]]) == list(one[name].asstr()[:][one[f"pairs/{side}_index"][:]])
        assert set(many["pairs"]) == set(one["pairs"])
        for column in set(one["pairs"]) - {"caption_index", "image_index", "checksum"}:
            assert_equal(many["pairs"][column][:], one["pairs"][column][:], column)
        if not atol:  # a checksum of the pair's numbers: equal with them
            np.testing.assert_array_equal(many["pairs/checksum"][:], one["pairs/checksum"][:])
        for group, key in (("captions", "text"), ("images", "path")):
            order = {name: row for row, name in enumerate(one[group][key].asstr()[:])}
            rows = [order[name] for name in many[group][key].asstr()[:]]
            for column in ("contributions", "embedding", "n_nodes", "status"):
                if column in one[group]:
                    assert_equal(many[group][column][:], one[group][column][:][rows], f"{group}/{column}")
        assert (many["pairs/status"][:] == 1).all()


# --- the plan, pure ------------------------------------------------------------------------------------------------
def test_the_plan_gives_each_device_its_block_and_the_tasks_overrides_win(tmp_path, model_dirs):
    tasks = plan_shards(["cuda:0", "cuda:1", "cuda:1"], threads=4)
    assert tasks == [ShardTask(0, 3, "cuda:0", 4), ShardTask(1, 3, "cuda:1", 4), ShardTask(2, 3, "cuda:1", 4)]
    config = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"])
    arguments = attribute_arguments(config, ["model.device=cpu", "runtime.threads=2", "attribution.n_steps=3"], tasks[2])
    assert arguments[:2] == ["attribute", str(config)]
    loaded = load_config(config, arguments[2:])  # the config the worker runs: the task's settings after the user's
    assert (loaded.runtime.shard_index, loaded.runtime.num_shards, loaded.model.device, loaded.runtime.threads) == (2, 3, "cuda:1", 4)
    assert loaded.attribution.n_steps == 3  # the user's other overrides stay
    assert loaded.run_directory == tmp_path / "run" / "shard-00002-of-00003"
    assert plan_shards(["cpu", "cpu"])[1].overrides() == ["runtime.shard_index=1", "runtime.num_shards=2", "model.device=cpu"]
    with pytest.raises(ConfigError, match="at least two"):
        plan_shards(["cuda:0"])


@pytest.mark.parametrize(("code", "rerun", "outcome"), [
    (0, False, "finished"), (3, False, "finished"),  # finished; failed items are retried by a rerun of the whole run
    (75, True, "interrupted"), (1, True, "failed"), (-9, True, "failed"),  # a rerun resumes the shard
    (2, False, "refused"),  # refused before writing: the same refusal again
])
def test_which_worker_ends_a_rerun_can_finish(code, rerun, outcome):
    assert needs_rerun(code) is rerun
    assert outcome_of(code) == outcome


def test_a_worker_killed_by_the_forwarded_signal_was_interrupted_and_the_run_exits_as_one_process_would():
    assert outcome_of(-signal.SIGTERM, was_stopped=True) == "interrupted"  # before its handler was installed
    assert outcome_of(-signal.SIGTERM) == "failed"  # a SIGTERM this process did not send
    assert combined_exit_code(["interrupted", "interrupted"]) == 75
    assert combined_exit_code(["interrupted", "refused"]) == 2
    assert combined_exit_code(["refused", "failed", "interrupted"]) == 1


def test_workers_share_the_cpus_unless_runtime_threads_is_set():
    assert [worker_threads(n, None, 16) for n in (1, 2, 3, 8, 32)] == [16, 8, 5, 2, 1]
    assert worker_threads(4, 3, 16) == 3  # runtime.threads: per worker, as given


def test_devices_are_cuda_n_or_cpu_and_auto_is_every_visible_gpu():
    def no_gpu_question() -> int:
        raise AssertionError("CPU workers need no GPU count")

    assert parse_devices("cpu,cpu", no_gpu_question) == ["cpu", "cpu"]
    assert parse_devices("auto", lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices(" cuda:1, cuda:1 ,cpu", lambda: 2) == ["cuda:1", "cuda:1", "cpu"]
    for text, gpus, message in [("auto", 0, "sees none"), ("cuda:2", 2, r"cuda:2: this process sees 2 GPU\(s\)"),
                                ("cuda", 1, "'cuda' is not a device"), ("cpu,,cpu", 1, "'' is not a device"),
                                ("cuda:0", 0, "sees no GPU")]:
        with pytest.raises(ConfigError, match=message) as caught:
            parse_devices(text, lambda gpus=gpus: gpus)
        assert caught.value.setting == "devices"


# --- refused before any worker starts -----------------------------------------------------------------------------
def test_what_would_stop_the_merge_is_refused_before_a_worker_starts(tmp_path, model_dirs):
    config = write_pipeline_config(tmp_path / "run.yaml", model_dirs["clip"])
    expect(["attribute", config, "--devices", "cpu,cpu", "--shard", "0/2"], 2, "--devices and --shard do not go together")
    expect(["attribute", config, "--devices", "cpu,cpu", "runtime.num_shards=3"], 2,
           r"--devices: the config already splits the run into 3 shards \(runtime.num_shards\)")
    (tmp_path / "run" / "shard-00000-of-00003").mkdir(parents=True)  # an earlier split into three
    expect(["attribute", config, "--devices", "cpu,cpu"], 2, "--devices: .* holds shards of another split \\(shard-00000-of-00003\\)")
    (tmp_path / "run" / "shard-00000-of-00003").rmdir()
    (tmp_path / "run" / "run.h5").write_bytes(b"")  # a file that is no merge of shards
    expect(["attribute", config, "--devices", "cpu,cpu"], 2, "run.h5 exists and is no merge of shards .* pass --overwrite to replace it")
    assert not list((tmp_path / "run").glob("shard-*"))  # nothing started


# --- worker processes -----------------------------------------------------------------------------------------------
@pytest.mark.slow  # two worker processes
def test_devices_cpu_cpu_gives_the_pairs_and_numbers_of_one_process(one_process):
    config, whole = one_process
    code, output = invoke("attribute", config, "--devices", "cpu,cpu", "--json", "-q", "output.directory=two")
    assert code == 0, output
    summary = json_line(output)
    assert (summary["pairs"], summary["done"], summary["skipped"], summary["failed"]) == (N_PAIRS, N_PAIRS, 0, 0)
    merged = config.parent / "two" / "run.h5"
    assert summary["directory"] == str(merged.parent)
    assert_same_run(whole, merged)
    with h5py.File(merged, "r") as f:
        assert json.loads(f.attrs["merged_from"]) == ["shard-00000-of-00002/run.h5", "shard-00001-of-00002/run.h5"]
        # the workers record the command that started them (here the test runner's), not their own command lines
        assert f.attrs["command"] == " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


@pytest.mark.slow  # two worker processes, one of them refused
def test_a_worker_that_did_not_finish_is_named_and_nothing_is_merged(one_process):
    config, _ = one_process
    busy = config.parent / "busy"
    with writer_lock(busy / "shard-00001-of-00002", "another writer"):  # the second shard's directory is taken
        code, output = invoke("attribute", config, "--devices", "cpu,cpu", "-q", "output.directory=busy")
    assert code == 2, output
    flat = " ".join(output.split())
    assert re.search(r"shard 1/2 \(cpu\): refused \(exit 2\): Error: .*another writer", flat), output
    assert "not merged: 1 of 2 shards finished" in flat and not (busy / "run.h5").exists()
    with h5py.File(busy / "shard-00000-of-00002" / "run.h5", "r") as kept:  # the finished shard stays for the rerun
        assert (kept["pairs/status"][:] == 1).all() and len(kept["pairs/status"]) == N_PAIRS // 2


def attribute_until_signalled(config: Path, *, twice: bool) -> subprocess.CompletedProcess:
    """`xclip attribute --devices cpu,cpu`, its workers writing slowly (tests/slow_writes), sent SIGTERM once both
    workers report progress (a stage's summed total grew past the first worker's), and with ``twice`` a second
    SIGTERM once a worker says it stops."""
    command = [sys.executable, "-m", "xclip", "attribute", str(config), "--devices", "cpu,cpu", "output.directory=signalled"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SLOW_WRITES)})
    assert process.stderr is not None
    lines, first_totals, signalled = [], {}, 0
    for line in process.stderr:  # plain progress lines: stderr is not a terminal
        lines.append(line)
        progress = re.fullmatch(r"(captions|images): \d+/(\d+)", line.strip())
        if progress and not signalled and first_totals.setdefault(progress[1], progress[2]) != progress[2]:
            process.send_signal(signal.SIGTERM)
            signalled = 1
        elif twice and signalled == 1 and "finishing the current batch" in line:
            process.send_signal(signal.SIGTERM)
            signalled = 2
        if signalled == 1 + twice:
            break
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, "".join(lines) + stderr)


@pytest.mark.slow  # worker processes signalled mid-run, and two reruns
def test_sigterm_stops_the_workers_at_a_batch_and_the_rerun_merges_what_one_process_gives(one_process):
    config, whole = one_process
    output = config.parent / "signalled"
    stopped = attribute_until_signalled(config, twice=False)
    assert stopped.returncode == 75, stopped.stderr
    for index in range(2):  # each worker finished its batch and wrote it, then stopped with pairs still to do
        assert f"shard {index}/2 (cpu): signal SIGTERM: finishing the current batch" in stopped.stderr
        assert f"shard {index}/2 (cpu): interrupted (exit 75)" in stopped.stderr
        with h5py.File(output / f"shard-0000{index}-of-00002" / "run.h5", "r") as shard:
            assert (shard["pairs/status"][:] == 0).any()
    assert "not merged: 0 of 2 shards finished" in stopped.stderr and not (output / "run.h5").exists()
    killed = attribute_until_signalled(config, twice=True)  # a second signal kills the workers: still resumable
    assert killed.returncode == 75, killed.stderr
    assert "again: killing the workers" in killed.stderr and not (output / "run.h5").exists()
    finished = subprocess.run([sys.executable, "-m", "xclip", "attribute", str(config), "--devices", "cpu,cpu", "--json",
                               "-q", "output.directory=signalled"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads(finished.stdout)
    assert summary["skipped"] + summary["done"] == N_PAIRS
    assert_same_run(whole, output / "run.h5")


@pytest.mark.slow  # the shards of a plan, one of them interrupted and rerun
def test_a_task_of_the_plan_rerun_after_an_interruption_resumes_its_shard(one_process):
    """What scripts/ray_attribute.py does, without Ray: each task runs its command line; a task that ends with an
    exit code that needs a rerun runs the same command line again, which resumes its shard; then the merge. In
    batches of three, the block of the second shard starts inside a batch of one process's: the inputs there
    share a batch with others than in one process, and their numbers agree to rounding (docs/method.md)."""
    config, whole = one_process
    tasks = plan_shards(["cpu", "cpu"], threads=1)
    overrides = ["output.directory=planned", "runtime.batch_size=3"]
    first: list[tuple[str, int, int]] = []
    interrupted = run(load_config(config, attribute_arguments(config, overrides, tasks[1])[2:]),
                      should_stop=lambda: len(first) > 0, on_progress=lambda *report: first.append(report))
    assert interrupted.is_interrupted and first == [("captions", 3, N_PAIRS // 2)]
    assert needs_rerun(75)  # what the CLI exits with for such a run: the same task again
    again: list[tuple[str, int, int]] = []
    resumed = run(load_config(config, attribute_arguments(config, overrides, tasks[1])[2:]), on_progress=lambda *report: again.append(report))
    assert again[0] == ("captions", 3, N_PAIRS // 2 - 3)  # resumed: only the captions still pending
    assert (resumed.n_done, resumed.is_interrupted) == (N_PAIRS // 2, False)
    code, output = invoke(*attribute_arguments(config, overrides, tasks[0]), "--json", "-q")  # the task's command line
    assert code == 0 and json_line(output)["done"] == N_PAIRS // 2, output
    merge_shards(config.parent / "planned")
    # float64: rounding differences near 1e-16 of the numbers' size (cosines and their parts, at most 1); a pair
    # matched with another's input would differ by 1e-5 and more
    assert_same_run(whole, config.parent / "planned" / "run.h5", atol=1e-12)
