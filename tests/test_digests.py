"""Inputs identified by content and stored results guarded by checksums: a changed image is attributed again
(or refused where a map of it is drawn), zeroed bytes in a run file are found when read. An image edited in place
that keeps its size and modification time is found only with ``data.verify: always``."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from PIL import Image
from helpers import expect, invoke, jsonl_folder, write_config

from xclip.config import load_config
from xclip.disk.digests import file_identity, has_changed
from xclip.errors import ConfigError, StoreError
from xclip.run.runner import run
from xclip.store.reader import RunReader


def test_a_file_changes_with_its_content_not_its_time(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    recorded = file_identity(path)
    os.utime(path, ns=(recorded.mtime_ns + 10**9, recorded.mtime_ns + 10**9))  # touched: same bytes
    assert not has_changed(path, recorded)
    path.write_bytes(b"abd")  # same size, other bytes
    os.utime(path, ns=(recorded.mtime_ns, recorded.mtime_ns))  # even with the old time restored...
    assert not has_changed(path, recorded)  # ...size and time agree: the cheap check trusts them (as make does)
    assert has_changed(path, recorded, verify="always")  # data.verify: always reads the bytes
    os.utime(path, ns=(recorded.mtime_ns + 1, recorded.mtime_ns + 1))
    assert has_changed(path, recorded)
    path.unlink()
    assert has_changed(path, recorded)


def finished_project(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img1.png", "text": "a red dog"}')
    config = write_config(tmp_path, model_dirs["clip"])
    assert run(load_config(config)).n_done == 3
    return config


def stored_results(run_dir):
    with RunReader(run_dir) as stored:
        done = np.flatnonzero(stored.status("pairs") == 1)
        return stored.column("images", "embedding"), [stored.interactions(int(p)) for p in done], stored.column("pairs", "score")


def test_a_changed_image_is_attributed_again_on_resume_and_equals_a_fresh_run(tmp_path, model_dirs):
    config = finished_project(tmp_path, model_dirs)
    stale_scores = stored_results(tmp_path / "run")[2]
    image = tmp_path / "images" / "img1.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    summary = run(load_config(config))
    assert summary.changed_images == ["img1.png"] and summary.n_done == 2  # img1 is in two of the three pairs
    ours = stored_results(tmp_path / "run")
    fresh = write_config(tmp_path, str(model_dirs["clip"]))
    run(load_config(fresh, ["output.directory=fresh"]))
    theirs = stored_results(tmp_path / "fresh")
    # equal up to float32 rounding: the image was attributed in a batch of its own, the fresh run's in a batch of two
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=0, atol=1e-6)
    assert np.abs(ours[2] - stale_scores).max() > 1e-3  # and the new picture's scores are not the old ones
    assert run(load_config(config)).changed_images == []  # recorded anew: nothing changed since


def test_render_refuses_a_map_of_an_image_that_changed(tmp_path, model_dirs):
    finished_project(tmp_path, model_dirs)
    with RunReader(tmp_path / "run") as stored:
        image = stored.pair_inputs(0)[1]
        name = stored.image_path(image)
    Image.new("RGB", (50, 40), "white").save(tmp_path / "images" / name)
    expect(["render", tmp_path / "run", "--pair", "0"], 2, rf"image .*{name} of pair 0 changed since it was attributed")


@pytest.mark.parametrize("target", ["pairs/interactions", "images/contributions", "captions/embedding"])
def test_zeroed_bytes_are_found_when_read(tmp_path, model_dirs, target):
    finished_project(tmp_path, model_dirs)
    with h5py.File(tmp_path / "run" / "run.h5", "r+") as f:  # as a failing disk would: zeros in place
        row = f[target][0]
        f[target][0] = np.zeros_like(row)
    with RunReader(tmp_path / "run") as stored:
        group = target.split("/")[0]
        if group == "pairs":
            with pytest.raises(StoreError, match=r"pairs 0 is damaged \(its stored results do not match their checksum"):
                stored.interactions(0)
        else:
            with pytest.raises(StoreError, match=rf"{group} 0 is damaged"):
                stored.contributions(group, 0)
    code, output = invoke("render", tmp_path / "run", "--pair", "0")
    if target == "pairs/interactions":
        assert code == 1 and "pairs 0 is damaged" in output and "--overwrite" in output


def test_the_viewer_refuses_the_picture_of_an_image_that_changed(tmp_path, model_dirs):
    from xclip.show.viewer import RunData

    finished_project(tmp_path, model_dirs)
    data = RunData(tmp_path / "run")
    data.image(0)
    with RunReader(tmp_path / "run") as stored:
        name = stored.image_path(stored.pair_inputs(0)[1])
    Image.new("RGB", (50, 40), "white").save(tmp_path / "images" / name)
    with pytest.raises(ConfigError, match=rf"image {name} of pair 0 changed since it was attributed"):
        data.image(0)


def uncompressed_project(tmp_path, model_dirs, *overrides):
    """A finished run whose PNGs are stored uncompressed, so that other pixels of the same size take the same bytes."""
    config = write_config(tmp_path, model_dirs["clip"])
    jsonl_folder(tmp_path, '{"file_name": "img1.png", "text": "a red dog"}')
    for image in (tmp_path / "images").glob("*.png"):
        Image.open(image).convert("RGB").save(image, compress_level=0)
    assert run(load_config(config, list(overrides))).n_done == 3
    return config


def edit_in_place_keeping_size_and_time(path):
    """Other pixels, the same size in bytes, the old modification time restored (as ``cp -p`` or ``rsync -t`` leave
    a file)."""
    before = os.stat(path)
    width, height = Image.open(path).size
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, compress_level=0)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_identity(path).sha256 != stored_digest(path.parents[1] / "run", path.name)


def stored_digest(run_dir, name):
    with RunReader(run_dir) as stored:
        return stored.image_file(stored.image_paths().index(name)).sha256


def test_by_default_an_image_edited_in_place_keeping_size_and_time_is_trusted(tmp_path, model_dirs):
    """The documented consequence of ``data.verify: changed``: the resume keeps the old picture's results, and render
    draws its map over the new picture without a word."""
    config = uncompressed_project(tmp_path, model_dirs)
    stale = stored_results(tmp_path / "run")[2]
    edit_in_place_keeping_size_and_time(tmp_path / "images" / "img1.png")
    summary = run(load_config(config, ["data.verify=changed"]))
    assert summary.changed_images == [] and summary.n_done == 0 and summary.n_skipped == 3
    np.testing.assert_array_equal(stored_results(tmp_path / "run")[2], stale)
    code, output = invoke("render", tmp_path / "run", "--pair", "1")  # pair 1 is of img1.png
    assert code == 0, output


def test_verify_always_finds_an_image_edited_in_place_on_resume_and_names_it(tmp_path, model_dirs):
    config = uncompressed_project(tmp_path, model_dirs)  # made with the default: verify may change between runs
    stale = stored_results(tmp_path / "run")[2]
    edit_in_place_keeping_size_and_time(tmp_path / "images" / "img1.png")
    expect(["attribute", config, "data.verify=always", "-q"], 0, r"attributed again: 1 image\(s\) whose files changed .*\(img1\.png\)")
    scores = stored_results(tmp_path / "run")[2]
    assert scores[0] == stale[0] and np.abs(scores[1:] - stale[1:]).max() > 1e-3  # img1's two pairs, and only they
    assert run(load_config(config, ["data.verify=always"])).changed_images == []  # recorded anew


def test_render_of_a_run_made_with_verify_always_refuses_an_image_edited_in_place(tmp_path, model_dirs):
    uncompressed_project(tmp_path, model_dirs, "data.verify=always")
    edit_in_place_keeping_size_and_time(tmp_path / "images" / "img1.png")
    expect(["render", tmp_path / "run", "--pair", "1"], 2, r"image img1\.png of pair 1 changed since it was attributed")


def test_verify_is_not_a_setting_a_resume_must_match(tmp_path):
    config = write_config(tmp_path, "xclip:demo")
    fingerprints = {load_config(config, [f"data.verify={verify}"]).result_fingerprint() for verify in ("changed", "always")}
    assert len(fingerprints) == 1 and "verify" not in fingerprints.pop()
    assert load_config(config, ["data.verify=always"]).data.verify == "always"
    (tmp_path / "run.yaml").write_text((tmp_path / "run.yaml").read_text().replace("  format:", "  verify: sometimes\n  format:"))
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: data\.verify: Input should be 'changed' or 'always' \(got 'sometimes'\)"):
        load_config(config)
