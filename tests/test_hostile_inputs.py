"""Faults and hostile input: file systems without locks, hostile configs, damaged caches and result files.

Each case is driven the way it was found (a subprocess on a file system whose locks fail, a config a user or an
attacker can write, a file damaged on disk) and asserts the exit code or error and that the message names the
problem.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import make_images
from typer.testing import CliRunner

import xclip
from xclip.cli.app import app
from xclip.cli.errors import EXIT_USAGE
from xclip.config import MAX_CONFIG_BYTES, MAX_NESTING_DEPTH, load_config
from xclip.errors import ConfigError
from xclip.attribution.panels import Calibration, PanelLayout, cache_file, path_settings, save_calibration, weights_fingerprint

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPOSITORY / "configs" / "demo.yaml"
XCLIP = [sys.executable, "-m", "xclip"]
runner = CliRunner()
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


@pytest.mark.slow  # subprocesses under an LD_PRELOAD shim
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


# --- configs --------------------------------------------------------------------------------------------------
def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("nesting", ["[" * 1000 + "]" * 1000, "{a: " * 1000 + "}" * 1000, "\n  " + "- " * 1000 + "x"])
def test_a_deeply_nested_config_is_refused_quickly_naming_the_file(tmp_path: Path, nesting: str) -> None:
    config = tmp_path / "deep.yaml"
    config.write_text(f"model: {nesting}\n")
    started = time.perf_counter()
    code, output = _invoke("attribute", config)
    assert time.perf_counter() - started < 5  # the quadratic parse took 6.9 s at this depth, then a RecursionError
    assert code == EXIT_USAGE
    assert f"{config}:" in output and f"nested more than {MAX_NESTING_DEPTH} levels deep" in output


def test_a_deeply_nested_override_is_refused_quickly() -> None:
    started = time.perf_counter()
    code, output = _invoke("attribute", DEMO_CONFIG, "model.name=" + "[" * 20000 + "]" * 20000)
    assert time.perf_counter() - started < 5
    assert code == EXIT_USAGE
    assert "command line override 'model.name=[[[" in output and "nested more than" in output
    assert len(output) < 1000  # the 40,000-character override is shortened in the message
    code, output = _invoke("attribute", DEMO_CONFIG, "model" + ".x" * 100 + "=1")
    assert code == EXIT_USAGE and "101 keys deep" in output


def test_a_config_nested_to_the_limit_is_read(tmp_path: Path) -> None:
    nested = "[" * (MAX_NESTING_DEPTH - 2) + "a" + "]" * (MAX_NESTING_DEPTH - 2)  # a list of lists in a section
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name: xclip:demo\ndata:\n  format: queries\n  root: .\n  queries: {nested}\noutput:\n  directory: run\n")
    with pytest.raises(ConfigError, match=r"data\.queries\.0: Input should be a valid string"):
        load_config(config)  # parsed and validated: refused by the schema, not by the depth limit


def test_a_config_path_that_never_ends_is_read_only_to_the_limit() -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"/dev/zero is more than {MAX_CONFIG_BYTES} bytes"):
        load_config("/dev/zero")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("override", ["runtime.seed=123456789012345678901234", "attribution.reference_seed=-1"])
def test_a_seed_out_of_torchs_range_is_a_config_error(override: str) -> None:
    code, output = _invoke("attribute", DEMO_CONFIG, override)
    assert code == EXIT_USAGE
    assert f"command line override '{override}': {override.partition('=')[0]}:" in output


def test_a_reference_seed_out_of_range_is_refused_by_the_api() -> None:
    model = xclip.load_model("xclip:demo", device="cpu")
    with pytest.raises(ConfigError, match=rf"reference_seed must be a whole number of at least 0 and at most {2**64 - 1}"):
        xclip.InteractionAttribution(model, reference_seed=2**64)


@pytest.mark.parametrize(("directory", "problem"), [("/proc/self", "cannot hold a run: no file can be created in it"),
                                                   ("/etc/hostname", "is a file, not a directory")])
def test_an_output_directory_that_cannot_hold_a_run_is_named(directory: str, problem: str) -> None:
    if not Path(directory).exists():
        pytest.skip(f"no {directory} here")
    code, output = _invoke("attribute", DEMO_CONFIG, f"output.directory={directory}")
    assert code == EXIT_USAGE and "XCLIP_DEBUG" not in output  # a wrong path, refused before anything was loaded
    assert problem in output
    assert "keep taking and releasing" not in output  # the lock's message after 100 attempts, which misled


# --- the layout cache -----------------------------------------------------------------------------------------
def _calibration(number: int) -> Calibration:
    settings = path_settings(text_layer=-1, image_layer=-1, image_reference="noise", text_filler=None, blur_radius=16.0,
                             reference_seed=number)
    return Calibration(settings=settings, text=(0.25, 0.5), image=(0.5,), measured={"saved_by": number})


def _save_many(path: Path, first: int, count: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    for number in range(first, first + count):
        save_calibration(path, SimpleNamespace(name="stub"), _calibration(number), fingerprint="f" * 16)


def test_calibrations_ending_together_keep_each_others_layouts(tmp_path: Path) -> None:
    path = tmp_path / "layouts.json"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(3)
    savers = [context.Process(target=_save_many, args=(path, first, 40, start)) for first in (0, 1000, 2000)]
    for saver in savers:
        saver.start()
    for saver in savers:
        saver.join(60)
        assert saver.exitcode == 0
    saved = json.loads(path.read_text())["calibrations"]
    assert sorted(entry["settings"]["reference_seed"] for entry in saved) == [*range(40), *range(1000, 1040), *range(2000, 2040)]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_killed_saves_temporary_file_is_removed_and_a_failed_save_leaves_none(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "layouts.json"
    left_by_a_kill = tmp_path / ".layouts.json.tmp-4194303"  # a save killed between writing and renaming
    left_by_a_kill.write_text('{"format": 1, "calibr')
    save_calibration(path, SimpleNamespace(name="stub"), _calibration(1), fingerprint="f" * 16)
    assert not left_by_a_kill.exists()

    def full_disk(temporary: Path, target: Path) -> None:
        raise OSError(28, "No space left on device", str(temporary))

    monkeypatch.setattr("xclip.attribution.panels.install_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_calibration(path, SimpleNamespace(name="stub"), _calibration(2), fingerprint="f" * 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".layouts.json.lock", "layouts.json"]
    assert len(json.loads(path.read_text())["calibrations"]) == 1  # the earlier file is whole


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda entry: "{not json", "cannot read layout file"),
    (lambda entry: json.dumps({"fingerprint": entry["fingerprint"], "calibrations": [{**entry["calibrations"][0], "text": 5}]}), "is damaged"),
    (lambda entry: json.dumps({"fingerprint": entry["fingerprint"], "calibrations": [{k: v for k, v in entry["calibrations"][0].items() if k != "text"}]}), "is damaged: its layout for .* has no 'text'"),
    (lambda entry: json.dumps({"fingerprint": entry["fingerprint"], "calibrations": "all of them"}), "is not an xclip layout file"),
])
def test_a_damaged_layout_cache_is_skipped_with_one_warning(tmp_path: Path, model_dirs, damage, problem: str) -> None:
    model = xclip.load_model(model_dirs["clip"], device="cpu")
    reference = xclip.InteractionAttribution(model, n_steps=2, tolerance=None)
    cached = cache_file(weights_fingerprint(model))
    save_calibration(cached, model, Calibration(settings=reference.path_settings, text=(0.3,), image=(0.3,)))
    assert xclip.InteractionAttribution(model).panel_layout.is_calibrated  # the whole file is found and used
    cached.write_text(damage(json.loads(cached.read_text())))
    with pytest.warns(UserWarning) as caught:
        attributor = xclip.InteractionAttribution(model)
    assert len(caught) == 1
    assert str(cached) in str(caught[0].message) and re.search(problem, str(caught[0].message))
    assert attributor.panel_layout == PanelLayout()
    maps = attributor.attribute(["a red dog"], make_images(1))  # the attribution goes on, with the default layout
    assert maps[0].interactions.shape == reference.attribute(["a red dog"], make_images(1))[0].interactions.shape
