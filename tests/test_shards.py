"""WebDataset tar shards and img2dataset parquet files read directly: samples named by key, damage rejected key by
key, shards split by whole files, member images read, hashed, drawn and served."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import invoke, make_images
from PIL import Image

from xclip.cli.errors import EXIT_FAILED_ITEMS
from xclip.config import DataConfig, load_config
from xclip.disk.archives import ArchiveMembers, MemberBytes, list_tar
from xclip.disk.digests import file_identity, has_changed
from xclip.errors import ConfigError, InputError
from xclip.models.base import read_image
from xclip.run.data import read_dataset
from xclip.run.pairing import pairs_to_attribute, shard_dataset
from xclip.run.runner import run
from xclip.run.shards import expand_patterns, plan_shard, sample_metadata
from xclip.show.viewer import RunData
from xclip.store.reader import RunReader


# --- inputs -------------------------------------------------------------------------------------------------------
def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def good_sample(i: int, kind: str = "PNG") -> dict[str, bytes]:
    """Sample ``i``: its own random picture, a caption naming it, img2dataset's metadata."""
    extension = {"PNG": "png", "JPEG": "jpg"}[kind]
    return {
        extension: encoded(make_images(1, seed=i)[0], kind),
        "txt": f"a red dog number {i}".encode(),
        "json": json.dumps({"key": f"{i:09d}", "url": f"http://example.com/{i}.png"}).encode(),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar as img2dataset writes one: each sample's members together (``KEY.EXT``), in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def cut_tar(path: Path, member: str, keep: int) -> None:
    """Truncate ``path`` ``keep`` bytes into ``member``'s data."""
    offset = next(m.offset for m in list_tar(path).members if m.name == member)
    os.truncate(path, offset + keep)


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    """img2dataset's parquet layout: key, txt, status, error_message, url and the image bytes in ``jpg``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "key": [row["key"] for row in rows],
        "txt": [row.get("txt") for row in rows],
        "jpg": pa.array([row.get("jpg") for row in rows], pa.binary()),
        "status": [row.get("status", "success") for row in rows],
        "error_message": [row.get("error_message") for row in rows],
        "url": [f"http://example.com/{row['key']}.jpg" for row in rows],
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def damaged_shards(root: Path) -> dict[str, str]:
    """Two tar shards holding eight good samples and planted damage; returns each damaged key's expected rejection
    (records the reader rejects) or failure (images the run fails), by its key."""
    key = "{:09d}".format
    write_tar(root / "shards" / "part-00000.tar", [
        (key(0), good_sample(0)),
        (key(1), good_sample(1, "JPEG")),
        (key(2), {"png": good_sample(2)["png"]}),  # no caption
        (key(3), {**good_sample(3), "png": good_sample(3)["png"][:60]}),  # image bytes cut
        (key(4), good_sample(4)),
        (key(5), {"png": b"these are not the bytes of any image", "txt": b"a blue cat"}),
        (key(6), {**good_sample(6), "txt": b"caf\xe9 au lait"}),  # Latin-1, not UTF-8
        (key(7), {**good_sample(7, "JPEG"), "jpg": good_sample(7, "JPEG")["jpg"][:400]}),  # JPEG cut
    ])
    last = write_tar(root / "shards" / "part-00001.tar", [(key(k), good_sample(k)) for k in range(8, 12)])
    cut_tar(last, f"{key(10)}.png", keep=50)  # the tar ends inside sample 10's image: 10 and 11 are lost, 8 and 9 stay
    return {
        key(2): "part-00000.tar: 000000002: no caption (.txt)",
        key(3): "part-00000.tar/000000003.png",
        key(5): "part-00000.tar/000000005.png",
        key(6): "part-00000.tar: 000000006: the caption (.txt) is not UTF-8",
        key(7): "part-00000.tar/000000007.jpg",
        key(10): "part-00001.tar: 000000010: the file ends inside 000000010.png",
    }


def shard_config(root: Path, model: str, data: dict, **sections: dict) -> Path:
    """``root/run.yaml``: a float64 run (2 nodes) of ``data`` into ``root/run``."""
    config = {
        "model": {"name": model, "device": "cpu", "dtype": "float64"},
        "attribution": {"n_steps": 2, "tolerance": None},
        "data": data,
        "output": {"directory": "run"},
        "runtime": {"batch_size": 2},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_table(run_file: Path) -> dict[tuple[str, str], tuple[str, float]]:
    """Each pair of a run file by (caption, image path): its status and score."""
    with h5py.File(run_file, "r") as f:
        captions, images = f["captions/text"].asstr()[:], f["images/path"].asstr()[:]
        statuses = f["pairs/status"][:]
        return {
            (captions[c], images[i]): (int(s), float(score))
            for c, i, s, score in zip(f["pairs/caption_index"][:], f["pairs/image_index"][:], statuses, f["pairs/score"][:])
        }


# --- reading ------------------------------------------------------------------------------------------------------
def test_brace_patterns_expand_in_order_and_missing_files_are_named(tmp_path):
    for name in ("part-00000.tar", "part-00001.tar", "part-00002.tar", "other/a.tar"):
        write_tar(tmp_path / name, [("0", good_sample(0))])
    shards = str(tmp_path / "part-{00002..00000}.tar")
    assert [p.name for p in expand_patterns([shards], "data.shards")] == ["part-00002.tar", "part-00001.tar", "part-00000.tar"]
    # glob matches sorted; a file named twice keeps its first place
    named = expand_patterns([str(tmp_path / "part-00001.tar"), str(tmp_path / "*.tar")], "data.shards")
    assert [p.name for p in named] == ["part-00001.tar", "part-00000.tar", "part-00002.tar"]
    with pytest.raises(ConfigError, match=r"not a file: .*part-00003.tar, .*part-00004.tar"):
        expand_patterns([str(tmp_path / "part-{00000..00004}.tar")], "data.shards")


def test_config_paths_are_relative_to_the_config_and_the_root_is_the_patterns_folder(tmp_path):
    config_path = shard_config(tmp_path, "xclip:demo", {"format": "webdataset", "shards": "data/laion/part-{0..3}.tar"})
    config = load_config(config_path)
    assert config.data.shards == [str(tmp_path / "data/laion/part-{0..3}.tar")]
    assert config.data.root == (tmp_path / "data" / "laion").resolve()
    explicit = load_config(config_path, ["data.root=data"])
    assert explicit.data.root == (tmp_path / "data").resolve()
    # the shard list is a path: moving the project does not change the settings a resume must match
    assert "laion" not in config.result_fingerprint()
    with pytest.raises(ConfigError, match="data.format 'parquet' needs data.files"):
        load_config(config_path, ["data.format=parquet"])
    with pytest.raises(ConfigError, match="data.shards is read with data.format 'webdataset' only"):
        load_config(config_path, ["data.format=sidecar", "data.root=."])


def test_every_damaged_sample_is_named_by_its_key_and_the_rest_are_read(tmp_path):
    expected = damaged_shards(tmp_path)
    dataset = read_dataset(DataConfig(format="webdataset", shards=[str(tmp_path / "shards/part-{00000..00001}.tar")]))
    root = (tmp_path / "shards").resolve()
    images = [str(path.relative_to(root)) for path in dataset.images]
    # every sample with a caption and an image bytes is a pair, damaged image bytes included (decoding fails later)
    assert images == [f"part-00000.tar/{k:09d}.{'jpg' if k in (1, 7) else 'png'}" for k in (0, 1, 3, 4, 5, 7)] + [
        f"part-00001.tar/{k:09d}.png" for k in (8, 9)]
    assert dataset.captions[:2] == ["a red dog number 0", "a red dog number 1"]
    assert [tuple(p) for p in dataset.given_pairs] == [(k, k) for k in range(8)]
    assert len(dataset.rejected) == 3
    for key in ("000000002", "000000006", "000000010"):
        assert any(line.startswith(expected[key]) for line in dataset.rejected), (key, dataset.rejected)
    # the metadata stays reachable by the image's member path
    with ArchiveMembers() as archives:
        assert sample_metadata(dataset.images[0], archives) == {"key": "000000000", "url": "http://example.com/0.png"}


def test_a_tar_cut_between_samples_keeps_them_and_says_where_it_ends(tmp_path):
    whole = write_tar(tmp_path / "a.tar", [(f"{k:09d}", good_sample(k)) for k in range(3)])
    end = next(m for m in list_tar(whole).members if m.name == "000000001.json")
    os.truncate(whole, end.offset + 512)  # the end of sample 1, padded to tar's block: sample 2 is gone whole
    dataset = read_dataset(DataConfig(format="webdataset", shards=[str(whole)]))
    assert [p.name for p in dataset.images] == ["000000000.png", "000000001.png"]
    assert dataset.rejected == [f"a.tar: the file ends at byte {end.offset + 512} after 000000001.json, where tar's "
                                "end-of-archive blocks belong (cut or damaged): samples after it, if any, are lost"]
    garbage = tmp_path / "b.tar"
    garbage.write_bytes(b"not a tar" * 100)
    with pytest.raises(ConfigError, match=r"b.tar: the whole file is unreadable: .* is not an uncompressed tar archive"):
        read_dataset(DataConfig(format="webdataset", shards=[str(garbage)]))


def test_parquet_rows_that_failed_to_download_are_counted_and_skipped(tmp_path):
    rows = [{"key": f"{k:09d}", "txt": f"a photo {k}", "jpg": encoded(make_images(1, seed=k)[0], "JPEG")} for k in range(5)]
    rows[1] = {"key": "000000001", "status": "failed_to_download", "error_message": "HTTP 404"}
    rows[3]["txt"] = None
    write_parquet(tmp_path / "p" / "part-00000.parquet", rows)
    dataset = read_dataset(DataConfig(format="parquet", files=[str(tmp_path / "p/*.parquet")]))
    assert [p.name for p in dataset.images] == ["000000000.jpg", "000000002.jpg", "000000004.jpg"]
    assert dataset.captions == ["a photo 0", "a photo 2", "a photo 4"]
    assert dataset.rejected == ["part-00000.parquet: 000000001: status failed_to_download (HTTP 404)",
                                "part-00000.parquet: 000000003: no caption (txt is null)"]
    with ArchiveMembers() as archives:
        metadata = sample_metadata(dataset.images[1], archives)
    assert metadata is not None and metadata["url"] == "http://example.com/000000002.jpg" and "jpg" not in metadata


def test_a_parquet_of_addresses_only_is_refused_with_how_to_download_it(tmp_path):
    pq.write_table(pa.table({"url": ["http://example.com/a.jpg"], "caption": ["a dog"]}), tmp_path / "urls.parquet")
    with pytest.raises(ConfigError, match=r"holds no image bytes.*download the images first, with img2dataset --url_list"):
        read_dataset(DataConfig(format="parquet", files=[str(tmp_path / "urls.parquet")]))


def test_members_are_read_back_byte_for_byte_in_any_order(tmp_path):
    samples = [(f"{k:09d}", good_sample(k)) for k in range(5)]
    tar = write_tar(tmp_path / "s.tar", samples)
    parquet = write_parquet(tmp_path / "s.parquet", [{"key": key, "txt": "x", "jpg": members["png"]} for key, members in samples])
    with ArchiveMembers(max_open=1) as archives:  # one archive open at a time: every switch reopens
        for k in (3, 0, 4, 1, 1, 2):
            key, members = samples[k]
            assert archives.read(tar / f"{key}.png").data == members["png"]
            assert archives.read(parquet / f"{key}.jpg").data == members["png"]  # rows behind the cursor restart it
        with pytest.raises(InputError, match="holds no member '000000009.png'"):
            archives.read(tar / "000000009.png")
    # a pickled reader (a DataLoader worker's) opens its own files
    import pickle

    assert pickle.loads(pickle.dumps(archives)).read(tar / "000000002.png").data == samples[2][1]["png"]


def test_a_member_is_identified_by_its_bytes_and_its_archive_time(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [("a", good_sample(0)), ("b", good_sample(1))])
    member = tar / "b.png"
    identity = file_identity(member)
    data = good_sample(1)["png"]
    assert (identity.size, identity.sha256, identity.mtime_ns) == (len(data), hashlib.sha256(data).hexdigest(), tar.stat().st_mtime_ns)
    assert identity == file_identity(MemberBytes(member, data, tar.stat().st_mtime_ns))
    assert not has_changed(member, identity)
    os.utime(tar, ns=(1, 1))  # touched: read again, same bytes
    assert not has_changed(member, identity)
    write_tar(tar, [("a", good_sample(0)), ("b", good_sample(5))])
    assert has_changed(member, identity)
    assert not has_changed(tar / "a.png", file_identity(tar / "a.png"), verify="always")
    assert has_changed(tar / "gone.png", identity)


def test_read_image_decodes_a_member_path_and_names_it_when_damaged(tmp_path):
    picture = make_images(1, seed=4)[0]
    tar = write_tar(tmp_path / "s.tar", [("a", {"png": encoded(picture)}), ("b", {"png": encoded(picture)[:70]})])
    image, _ = read_image(tar / "a.png")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(picture.convert("RGB")))
    with pytest.raises(InputError, match=r"cannot read image .*s.tar/b.png"):
        read_image(tar / "b.png")
    with pytest.raises(InputError, match="holds no member 'c.png'"):
        read_image(str(tar / "c.png"))


def test_shards_take_whole_files_in_contiguous_blocks(tmp_path):
    for k in range(5):
        write_tar(tmp_path / f"part-{k}.tar", [(f"{k}{j}", good_sample(2 * k + j)) for j in range(2)])
    data = DataConfig(format="webdataset", shards=[str(tmp_path / "part-{0..4}.tar")])
    assert [[f.name for f in plan_shard(data, i, 2).own] for i in range(2)] == [["part-0.tar", "part-1.tar", "part-2.tar"], ["part-3.tar", "part-4.tar"]]
    with pytest.raises(ConfigError, match="runtime.num_shards 6 exceeds the 5 file"):
        plan_shard(data, 0, 6)
    first, second = read_dataset(data, (0, 2)), read_dataset(data, (1, 2))
    assert {p.parent.name for p in second.images} == {"part-3.tar", "part-4.tar"} and len(second.images) == 4
    assert second.shard_files is not None and first.shard_files is not None
    assert second.shard_files.names == ["part-3.tar", "part-4.tar"]
    assert first.shard_files.all_sha256 == second.shard_files.all_sha256  # merging compares it
    assert first.shard_files.own_sha256 != second.shard_files.own_sha256
    # pairing.mode all crosses a shard's own captions and images; the shard's pairs are all its own
    config = load_config(shard_config(tmp_path, "xclip:demo", {"format": "webdataset", "shards": "part-{0..4}.tar"},
                                      pairing={"mode": "all"}), ["runtime.shard_index=1", "runtime.num_shards=2"])
    pairs = pairs_to_attribute(config, second, None, None, lambda done, total: None)  # type: ignore[arg-type]
    assert len(pairs) == 16 and len(shard_dataset(second, pairs, config).given_pairs) == 16


# --- runs ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a run of the random CLIP, then render and the viewer
def test_a_damaged_webdataset_runs_every_good_pair_and_names_each_damaged_key(tmp_path, model_dirs):
    expected = damaged_shards(tmp_path)
    config = shard_config(tmp_path, model_dirs["clip"], {"format": "webdataset", "shards": ["shards/part-0000{0..1}.tar"]},
                          runtime={"batch_size": 2, "num_workers": 1})  # decoded in a DataLoader worker
    code, output = invoke("attribute", config, "-q")
    assert code == EXIT_FAILED_ITEMS, output
    table = run_table(tmp_path / "run" / "run.h5")
    done = sorted(image for (_, image), (status, _) in table.items() if status == 1)
    assert done == [f"part-00000.tar/{k:09d}.{'jpg' if k == 1 else 'png'}" for k in (0, 1, 4)] + [
        f"part-00001.tar/{k:09d}.png" for k in (8, 9)]
    code, inspected = invoke("inspect", tmp_path / "run")
    flat = " ".join(inspected.split())
    for text in expected.values():
        assert text in flat, text
    with RunReader(tmp_path / "run") as reader:
        assert len(reader.rejected_records()) == 3
        first = next(i for i, (s, _) in enumerate(table.values()) if s == 1)
        image, _ = read_image(reader.pair(first).image)  # the member path the run stores opens
        assert image.size == make_images(1, seed=0)[0].size
    assert invoke("render", tmp_path / "run", "-p", str(first), "-q")[0] == 0
    drawn = Image.open(tmp_path / "run" / "heatmaps" / f"pair{first:06d}.png")
    assert drawn.size[0] > 100
    viewer = RunData(tmp_path / "run")
    thumbnail = Image.open(io.BytesIO(viewer.thumbnail(0)))  # smaller than a thumbnail: the picture itself
    np.testing.assert_array_equal(np.asarray(thumbnail), np.asarray(make_images(1, seed=0)[0]))
    assert viewer.image(first)[0].startswith(b"\x89PNG")


@pytest.mark.slow  # a run and its two shards, then a merge
def test_file_shards_merge_into_the_single_process_run(tmp_path, model_dirs):
    expected = damaged_shards(tmp_path)
    write_tar(tmp_path / "shards" / "part-00002.tar", [(f"{k:09d}", good_sample(k)) for k in range(20, 23)])
    data = {"format": "webdataset", "shards": "shards/part-{00000..00002}.tar"}
    whole = shard_config(tmp_path, model_dirs["clip"], data, output={"directory": "whole"})
    invoke("attribute", whole, "-q")
    config = shard_config(tmp_path, model_dirs["clip"], data)
    for shard in ("0/2", "1/2"):
        invoke("attribute", config, "-q", "--shard", shard)
    # shard 0 read part-00000 and part-00001, shard 1 part-00002 alone
    for name, files in (("shard-00000-of-00002", {"part-00000.tar", "part-00001.tar"}), ("shard-00001-of-00002", {"part-00002.tar"})):
        with RunReader(tmp_path / "run" / name) as reader:
            assert {path.split("/")[0] for path in reader.image_paths()} == files
            # shard 0's files hold the damaged samples, shard 1's none
            assert {line.split(":")[0] for line in reader.rejected_records()} == ({"part-00000.tar", "part-00001.tar"} if "part-00000.tar" in files else set())
    assert invoke("merge", tmp_path / "run")[0] == 0
    merged, single = run_table(tmp_path / "run" / "run.h5"), run_table(tmp_path / "whole" / "run.h5")
    assert list(merged) == list(single) and len(merged) == 11
    for key, (status, score) in single.items():
        assert merged[key][0] == status
        assert merged[key][1] == pytest.approx(score, rel=1e-12, abs=1e-15)
    with RunReader(tmp_path / "run") as reader, RunReader(tmp_path / "whole") as whole_reader:
        assert reader.rejected_records() == whole_reader.rejected_records()
        assert [r.split(":")[1].strip() for r in reader.rejected_records()] == ["000000002", "000000006", "000000010"]
        assert "shard_data_sha256" not in reader.attrs
        failures = " ".join(reader.errors("images", np.flatnonzero(reader.status("images") == 2)))
    for key in ("000000003", "000000005", "000000007"):
        assert expected[key] in failures


@pytest.mark.slow  # two runs of the random CLIP
def test_parquet_input_gives_the_numbers_of_the_same_samples_in_a_tar(tmp_path, model_dirs):
    samples = [(f"{k:09d}", {"jpg": encoded(make_images(1, seed=k)[0], "JPEG"), "txt": f"a photo of {k}".encode()}) for k in range(4)]
    write_tar(tmp_path / "t" / "part-00000.tar", samples)
    rows = [{"key": key, "txt": m["txt"].decode(), "jpg": m["jpg"]} for key, m in samples]
    write_parquet(tmp_path / "p" / "part-00000.parquet", [*rows[:2], {"key": "000000009", "status": "failed_to_download"}, *rows[2:]])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(load_config(shard_config(tmp_path / "a", model_dirs["clip"], {"format": "webdataset", "shards": "../t/*.tar"})))
    summary = run(load_config(shard_config(tmp_path / "b", model_dirs["clip"], {"format": "parquet", "files": "../p/part-00000.parquet"})))
    assert summary.n_rejected == 1 and summary.n_failed == 0
    from_tar, from_parquet = run_table(tmp_path / "a" / "run" / "run.h5"), run_table(tmp_path / "b" / "run" / "run.h5")
    assert [(c, i.replace(".tar", ".parquet")) for c, i in from_tar] == list(from_parquet)
    np.testing.assert_array_equal([s for _, s in from_tar.values()], [s for _, s in from_parquet.values()])


@pytest.mark.slow  # an interrupted run, resumed
def test_a_resume_skips_finished_keys_and_refuses_changed_shard_files(tmp_path, model_dirs):
    shard = write_tar(tmp_path / "shards" / "part-0.tar", [(f"{k:09d}", good_sample(k)) for k in range(6)])
    config = load_config(shard_config(tmp_path, model_dirs["clip"], {"format": "webdataset", "shards": "shards/part-0.tar"}))
    images_done = []
    first = run(config, on_progress=lambda stage, done, total: stage == "images" and images_done.append(done),
                should_stop=lambda: bool(images_done) and images_done[-1] >= 4)  # after 2 of the 3 batches of images
    with RunReader(tmp_path / "run") as reader:
        finished = [reader.image_paths()[i] for i in np.flatnonzero(reader.status("images") == 1)]
    assert first.is_interrupted and finished == [f"part-0.tar/{k:09d}.png" for k in range(4)]
    totals = {}
    second = run(config, on_progress=lambda stage, done, total: totals.setdefault(stage, total))
    assert not second.is_interrupted and second.n_done == 6
    assert totals["images"] == 2  # the finished keys were not read again
    # a caption edited in place, the file's size unchanged: the shard's own samples differ
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b"a red dog number 3", b"a red cat number 3"))
    assert shard.stat().st_size == len(data)
    with pytest.raises(ConfigError, match="the data files changed"):
        run(config)


@pytest.mark.slow  # two shards of a top-k run
def test_a_topk_shard_ranks_its_own_files_captions(tmp_path, model_dirs):
    for f in range(2):
        write_tar(tmp_path / "shards" / f"part-{f}.tar", [(f"{f}{k}", good_sample(3 * f + k)) for k in range(3)])
    config = shard_config(tmp_path, model_dirs["clip"], {"format": "webdataset", "shards": "shards/part-{0..1}.tar"},
                          pairing={"mode": "topk", "k": 2})
    for shard in ("0/2", "1/2"):
        assert invoke("attribute", config, "-q", "--shard", shard)[0] == 0
    for f in range(2):
        own_captions = {f"a red dog number {3 * f + k}" for k in range(3)}
        table = run_table(tmp_path / "run" / f"shard-0000{f}-of-00002" / "run.h5")
        assert len(table) == 6  # each of the shard's 3 images with its 2 best captions, of its own 3
        assert {caption for caption, _ in table} <= own_captions
        assert {image.split("/")[0] for _, image in table} == {f"part-{f}.tar"}
    assert len(list((tmp_path / "run").glob(".topk-ranking-*.npy"))) == 2  # one ranking per shard, not shared


@pytest.mark.slow  # a summary run of damaged shards in two file blocks, merged, against one process
def test_summary_shards_of_a_damaged_webdataset_merge_into_the_one_process_summary(tmp_path, model_dirs):
    expected = damaged_shards(tmp_path)
    data = {"format": "webdataset", "shards": "shards/part-{00000..00001}.tar"}
    summary = {"contributions": "none"}
    whole = shard_config(tmp_path, model_dirs["clip"], data, output={"directory": "whole", **summary})
    assert invoke("attribute", whole, "-q")[0] == EXIT_FAILED_ITEMS
    config = shard_config(tmp_path, model_dirs["clip"], data, output=summary)
    for shard in ("0/2", "1/2"):
        assert invoke("attribute", config, "-q", "--shard", shard)[0] == EXIT_FAILED_ITEMS
    assert invoke("merge", tmp_path / "run")[0] == 0
    merged, single = run_table(tmp_path / "run" / "run.h5"), run_table(tmp_path / "whole" / "run.h5")
    assert list(merged) == list(single) and sum(status == 1 for status, _ in single.values()) == 5
    for key, (status, score) in single.items():
        assert merged[key] == (status, score)  # the same pairs in the same batches: the same bits
    code, inspected = invoke("inspect", tmp_path / "run")
    flat = " ".join(inspected.split())
    for text in expected.values():
        assert text in flat, text
    with RunReader(tmp_path / "run") as reader, RunReader(tmp_path / "whole") as one:
        assert not reader.stores_contributions
        done = np.flatnonzero(reader.status("pairs") == 1)
        for index in done:
            ours, theirs = reader.pair_summary(int(index)), one.pair_summary(int(index))
            np.testing.assert_array_equal(ours.top_cells, theirs.top_cells)
            np.testing.assert_array_equal(ours.token.peak_patch, theirs.token.peak_patch)


@pytest.mark.slow  # a run of the random CLIP, then every pair drawn
def test_drawing_every_pair_of_a_tar_indexes_it_once(tmp_path, model_dirs, monkeypatch):
    write_tar(tmp_path / "shards" / "part-00000.tar", [(f"{k:09d}", good_sample(k)) for k in range(5)])
    config = shard_config(tmp_path, model_dirs["clip"], {"format": "webdataset", "shards": "shards/part-00000.tar"})
    assert invoke("attribute", config, "-q")[0] == 0
    import xclip.disk.archives as archives

    listed = []
    monkeypatch.setattr(archives, "list_tar", lambda path, listing=archives.list_tar: listed.append(path) or listing(path))
    assert invoke("render", tmp_path / "run", "-q")[0] == 0
    assert len(listed) == 1  # one index for the five figures, not one per figure
    for k in range(5):
        drawn = np.asarray(Image.open(tmp_path / "run" / "heatmaps" / f"pair{k:06d}.png"))
        assert drawn.shape[0] > 100 and drawn.std() > 0
