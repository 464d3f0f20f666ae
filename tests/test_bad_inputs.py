"""The bad-input battery: every input a user can get wrong, through the real CLI on a tiny local model.

Each case asserts the exit code, that the message names the problem (and where it is), that no traceback is
printed, and, where the run goes on, that the good items of the same run finished.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from helpers import (GOOD, assert_read_as_text, code_blocks, expect, good_images, invoke, jsonl_folder, make_images, section,
                     write_config)
from PIL import Image
from typer.testing import CliRunner

import xclip
from xclip.models.base import read_image
from xclip.cli.app import app
from xclip.cli.errors import EXIT_ERROR, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from xclip.config import load_config
from xclip.store.schema import SCHEMA_VERSION

runner = CliRunner()


# --- helpers ------------------------------------------------------------------------------------------------
def done_pairs(root: Path) -> list[tuple[str, str]]:
    with h5py.File(root / "run" / "run.h5", "r") as f:
        captions, images = f["captions/text"].asstr()[:], f["images/path"].asstr()[:]
        pairs = f["pairs"]
        return sorted(
            (str(images[i]), str(captions[c]))
            for c, i, s in zip(pairs["caption_index"][:], pairs["image_index"][:], pairs["status"][:])
            if s == 1
        )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: enough for Pillow to read the size and stop."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


# --- data records: a bad record is rejected with file:line, the good ones finish (exit 3) ------------------------
RECORDS = {
    "number": ("42", r"a record must be a JSON object with 'file_name' and 'text', got a number"),
    "list": ('["img0.png", "x"]', r"got a list"),
    "file_name int": ('{"file_name": 7, "text": "a dog"}', r"'file_name' must be a string, got a number"),
    "file_name null": ('{"file_name": null, "text": "a dog"}', r"'file_name' must be a string, got null"),
    "file_name empty": ('{"file_name": "", "text": "a dog"}', r"'file_name' is empty"),
    "file_name NUL": ('{"file_name": "img\\u0000.png", "text": "a dog"}', r"'file_name' holds a NUL character at position 3"),
    "not UTF-8": (b'{"file_name": "img0.png", "text": "caf\xe9"}', r"not UTF-8 text \(byte 0xe9 at column 39\)"),
    "caption NUL": ('{"file_name": "img0.png", "text": "a\\u0000dog"}', r"'text' holds a NUL character at position 1"),
    "lone surrogate": ('{"file_name": "img0.png", "text": "a \\ud800 dog"}', r"'text' holds U\+D800 at position 2"),
    "empty caption": ('{"file_name": "img0.png", "text": "   "}', r"'text' is empty: there is nothing to attribute"),
    "caption number": ('{"file_name": "img0.png", "text": 5}', r"'text' must be a string, got int"),
    "empty text list": ('{"file_name": "img0.png", "text": []}', r"'text' is an empty list"),
    "list with null": ('{"file_name": "img0.png", "text": ["a cat", null]}', r"'text'\[1\] must be a string, got NoneType"),
    "no text": ('{"file_name": "img0.png"}', r"the record has no 'text'"),
    "no keys": ("{}", r"the record has no 'file_name' or 'text'"),
    "invalid JSON": ('{"file_name": "img0.png", "text": }', r"invalid JSON: Expecting value \(column 35\)"),
    "huge caption": (json.dumps({"file_name": "img0.png", "text": "dog " * 5000}), r"'text' is 20000 characters long; at most 10000"),
    "empty caption, new image": ('{"file_name": "img9.png", "text": ""}', r"'text' is empty"),
    "missing image": ('{"file_name": "missing.png", "text": "a dog"}', r"image file not found: .*missing.png"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_bad_record_is_named_and_the_rest_finishes(tmp_path, model_dirs, case):
    line, message = RECORDS[case]
    folder = jsonl_folder(tmp_path, line)
    config = write_config(tmp_path, model_dirs["clip"])
    where = re.escape(f"{folder / 'metadata.jsonl'}:3") if case != "missing image" else "image"
    expect(["attribute", config, "-q"], 3, f"{where}.*{message}")
    also_good = [("img0.png", "a cat")] if case == "list with null" else []  # the record's other caption
    assert done_pairs(tmp_path) == sorted(GOOD + also_good)
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:  # a rejected record adds no image to attribute
        assert len(f["images/path"]) == (3 if case == "missing image" else 2)
    rejected = r"1 record\(s\) of the data files rejected .*" if case != "missing image" else ""  # an image failure
    expect(["inspect", tmp_path / "run"], 0, rejected + message)  # and inspect lists it


@pytest.mark.parametrize(
    ("case", "line", "stored"),
    [
        ("U+2028 inside a caption", '{"file_name": "img0.png", "text": "a cat\\u2028on a mat"}', "a cat\u2028on a mat"),
        ("U+0085 inside a caption", '{"file_name": "img0.png", "text": "a cat\u0085on a mat"}', "a cat\u0085on a mat"),
        ("CRLF line ends", '{"file_name": "img0.png", "text": "a green cat"}\r', "a green cat"),
    ],
)
def test_valid_records_with_unusual_characters_are_read(tmp_path, model_dirs, case, line, stored):
    jsonl_folder(tmp_path, line)
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q"], 0, "run.h5")
    assert done_pairs(tmp_path) == sorted([*GOOD, ("img0.png", stored)])


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, model_dirs):
    folder = jsonl_folder(tmp_path, '{"file_name": "img1.png", "text": "a cat"}')
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + (folder / "metadata.jsonl").read_bytes())
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q"], 0, "run.h5")
    assert len(done_pairs(tmp_path)) == 3


@pytest.mark.parametrize(
    ("case", "file_name"),
    [("parent", "../outside.png"), ("absolute", "/etc/hostname"), ("symlink", "link.png")],
)
def test_paths_out_of_the_data_root_are_refused_before_loading(tmp_path, model_dirs, case, file_name):
    folder = jsonl_folder(tmp_path, json.dumps({"file_name": file_name, "text": "a dog"}))
    make_images(1)[0].save(tmp_path / "outside.png")
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    expect(["attribute", write_config(tmp_path, model_dirs["clip"])], 2, rf"metadata.jsonl:3: image path '{re.escape(file_name)}' escapes the data root")
    assert not (tmp_path / "run").exists()


def test_caption_beyond_the_context_is_truncated_and_flagged(tmp_path, model_dirs):
    long = "a red dog " * 40  # 120 tokens; the tiny model reads 77 positions
    jsonl_folder(tmp_path, json.dumps({"file_name": "img0.png", "text": long}))
    output = expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q", "--json"], 0, r"1 caption\(s\) are longer than the model's context")
    summary = next(json.loads(line) for line in output.splitlines() if line.startswith("{"))
    assert summary["truncated_captions"] == 1
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f["captions/is_truncated"][:].tolist() == [False, False, True] and f["captions/n_positions"][2] == 77


def test_special_strings_in_captions_are_text(model32):
    for special in model32.tokenizer.all_special_tokens:
        assert_read_as_text(model32, f"{special} a red circle")
        assert_read_as_text(model32, f"a red {special.upper()} circle {special}")


def test_a_caption_spelling_end_of_text_is_attributed_whole(tmp_path, model_dirs):
    """Once attributed as [<|startoftext|>, <|endoftext|>], not truncated, with a four-term value of about 0."""
    caption = "<|endoftext|> a red circle"
    jsonl_folder(tmp_path, json.dumps({"file_name": "img0.png", "text": caption}))
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q"], 0, "run.h5")
    assert ("img0.png", caption) in done_pairs(tmp_path)
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        captions = f["captions"]
        row = list(captions["text"].asstr()[:]).index(caption)
        n = int(captions["n_positions"][row])
        tokens = captions["tokens"][row, :n].astype(str).tolist()
        spans = captions["offsets"][row, :n].tolist()
        assert not captions["is_truncated"][row]
        assert captions["special"][row, :n].tolist() == [True] + [False] * (n - 2) + [True]
        assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>" and "<|endoftext|>" not in tokens[1:-1]
        assert "".join(caption[a:b] for a, b in spans[1:-1]) == caption.replace(" ", "")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"root": "nowhere"}, r"data.root .*/nowhere is not a folder"),
        ({"metadata": "images"}, r"data.metadata .*/images is not a file"),
        ({"metadata": "images/none.jsonl"}, r"data.metadata .*/images/none.jsonl is not a file"),
    ],
)
def test_data_paths_that_are_not_there(tmp_path, model_dirs, data, message):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = write_config(tmp_path, model_dirs["clip"], data={"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl", **data})
    expect(["attribute", config], 2, message)


def test_every_record_rejected_is_exit_2_with_the_reasons(tmp_path, model_dirs):
    folder = tmp_path / "images"
    good_images(folder)
    (folder / "metadata.jsonl").write_text("1\n2\n")
    expect(["attribute", write_config(tmp_path, model_dirs["clip"])], 2, r"no image-caption pairs found .* every record was rejected: .*metadata.jsonl:1: a record must be")


def test_topk_with_a_bad_caption_goes_on(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": ""}')
    config = write_config(tmp_path, model_dirs["clip"], pairing={"mode": "topk", "k": 1})
    expect(["attribute", config, "-q"], 3, r"metadata.jsonl:3: 'text' is empty")
    assert len(done_pairs(tmp_path)) == 2  # each image with its best caption


# --- CSV, COCO, sidecar and query files ---------------------------------------------------------------------
def csv_folder(root: Path, text: bytes) -> Path:
    folder = root / "images"
    good_images(folder)
    (folder / "pairs.csv").write_bytes(b"filepath,title\nimg0.png,a red dog\nimg1.png,two blue circles\n" + text)
    return folder


CSV_DATA = {"format": "csv", "root": "images", "metadata": "images/pairs.csv"}
CSV_CASES = {
    "short row": (b"img0.png\n", 3, r"pairs.csv:4: the row has 1 field\(s\), the header 2"),
    "long row": (b"img0.png,a cat,extra\n", 3, r"pairs.csv:4: the row has 3 field\(s\), the header 2"),
    "NUL in a caption": (b"img0.png,a \x00cat\n", 3, r"pairs.csv:4: column 'title' holds a NUL character at position 2"),
    "unterminated quote": (b'img0.png,"a cat\nimg1.png,a dog\n', 2, r"pairs.csv:4: cannot parse the CSV from this line on .*check its quotes"),
    "not UTF-8": (b"img0.png,caf\xe9\n", 2, r"pairs.csv:4: not UTF-8 text \(byte 0xe9\)"),
}


@pytest.mark.parametrize("separator", [",", "\t"])
@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv(tmp_path, model_dirs, case, separator):
    text, code, message = CSV_CASES[case]
    folder = csv_folder(tmp_path, text)
    csv_path = folder / "pairs.csv"
    csv_path.write_bytes(csv_path.read_bytes().replace(b",", separator.encode()))
    data = {**CSV_DATA, "csv_separator": separator}
    expect(["attribute", write_config(tmp_path, model_dirs["clip"], data), "-q"], code, message)
    if code == 3:
        assert done_pairs(tmp_path) == sorted(GOOD)
    else:
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("header", "message"),
    [(b"", r"pairs.csv: the file is empty; it needs a header row"), (b"path,caption\n", r"pairs.csv: missing column\(s\) filepath, title")],
)
def test_csv_without_the_columns(tmp_path, model_dirs, header, message):
    folder = csv_folder(tmp_path, b"")
    (folder / "pairs.csv").write_bytes(header)
    expect(["attribute", write_config(tmp_path, model_dirs["clip"], CSV_DATA)], 2, message)


def coco_folder(root: Path, extra_annotations: list, images: object = None) -> None:
    folder = root / "images"
    good_images(folder)
    coco = {
        "images": images if images is not None else [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
        "annotations": [{"image_id": 1, "caption": "a red dog"}, {"image_id": 2, "caption": "two blue circles"}, *extra_annotations],
    }
    (folder / "captions.json").write_text(json.dumps(coco))


COCO_DATA = {"format": "coco", "root": "images", "metadata": "images/captions.json"}


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"image_id": 9, "caption": "a cat"}, r"captions.json annotations\[2\]: image_id 9 is not an id of the file's images"),
        ({"image_id": 1, "caption": None}, r"captions.json annotations\[2\]: 'caption' must be a string, got NoneType"),
        ({"image_id": 1}, r"captions.json annotations\[2\]: an annotation needs 'image_id' and 'caption'"),
    ],
)
def test_bad_coco_annotation(tmp_path, model_dirs, annotation, message):
    coco_folder(tmp_path, [annotation])
    expect(["attribute", write_config(tmp_path, model_dirs["clip"], COCO_DATA), "-q"], 3, message)
    assert done_pairs(tmp_path) == sorted(GOOD)


def test_not_a_coco_file(tmp_path, model_dirs):
    coco_folder(tmp_path, [], images={"id": 1})
    expect(["attribute", write_config(tmp_path, model_dirs["clip"], COCO_DATA)], 2, r"captions.json: not a COCO captions file")


def test_sidecar_line_that_is_not_utf8(tmp_path, model_dirs):
    folder = tmp_path / "images"
    good_images(folder)
    (folder / "img0.txt").write_bytes(b"a red dog\ncaf\xe9 au lait\n")
    (folder / "img1.txt").write_text("two blue circles\n")
    expect(["attribute", write_config(tmp_path, model_dirs["clip"], {"format": "sidecar", "root": "images"}), "-q"], 3,
           r"img0.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)")
    assert done_pairs(tmp_path) == sorted(GOOD)


def test_empty_query(tmp_path, model_dirs):
    good_images(tmp_path / "images")
    config = write_config(tmp_path, model_dirs["clip"], {"format": "queries", "root": "images", "queries": ["a dog", " "]})
    expect(["attribute", config], 2, r"data.queries\[1\]: the query is empty")


# --- images: refused per item, or read deliberately -------------------------------------------------------------
def _truncated(path: Path) -> None:
    make_images(1)[0].resize((64, 64)).save(path.with_suffix(".tmp.png"))
    data = path.with_suffix(".tmp.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(path, format="TIFF")


BAD_IMAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated": (_truncated, r"cannot read image .*bad.png: .*truncated"),
    "zero bytes": (lambda p: p.write_bytes(b""), r"image file .*bad.png is empty \(0 bytes\)"),
    "text named .jpg": (lambda p: p.with_suffix(".jpg").write_text("hello"), r"cannot read image .*bad.jpg: not an image format Pillow recognises"),
    "150000 x 1": (lambda p: Image.new("L", (150000, 1)).save(p), r"image .*bad.png is 150000 x 1 pixels: an aspect ratio beyond 50:1 is refused"),
    "decompression bomb": (lambda p: p.write_bytes(png_header(20000, 20000)), r"image .*bad.png is refused as a decompression bomb: Image size \(400000000 pixels\) exceeds limit"),
    "floating point": (_float_tiff, r"image .*bad.png holds floating-point pixels \(mode F\)"),
    "symlink loop": (lambda p: p.symlink_to(p.name), r"image file .*bad.png is a symlink loop"),
    "FIFO": (lambda p: os.mkfifo(p), r"image file .*bad.png is not a regular file \(a FIFO\)"),  # never opened: it would block
    "directory": (lambda p: p.mkdir(), r"image file .*bad.png is not a regular file \(a directory\)"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_fails_its_pairs_only(tmp_path, model_dirs, case):
    make, message = BAD_IMAGES[case]
    name = "bad.jpg" if case.endswith(".jpg") else "bad.png"
    folder = jsonl_folder(tmp_path, json.dumps({"file_name": name, "text": "a cat"}))
    make(folder / "bad.png")
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q"], 3, r"image 2: " + message)
    assert done_pairs(tmp_path) == sorted(GOOD)


def _gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def _exif_rotated(path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(path, exif=exif)


def _exif_orientation(orientation: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (40, 20), (0, 0, 255)).save(path, exif=exif)
    return write


def _palette_transparent(path: Path) -> None:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))
    image.save(path, transparency=0)


HANDLED_IMAGES: dict[str, tuple[Callable[[Path], object], str, Callable[[Image.Image], bool]]] = {
    # name: (writer, note recorded, property of the RGB image xclip reads)
    "16-bit greyscale": (lambda p: Image.fromarray(_gradient16()).save(p), "16-bit greyscale scaled to 8 bits",
                         lambda im: np.array_equal(np.asarray(im)[0, :, 0], np.round(_gradient16()[0] / 257).astype(np.uint8))),
    "RGBA": (lambda p: Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(p), "transparency composited over white",
             lambda im: np.asarray(im).min() == 255),
    "palette with transparency": (_palette_transparent, "transparency composited over white",
                                  lambda im: tuple(np.asarray(im)[0, 0]) == (255, 255, 255) and tuple(np.asarray(im)[0, 15]) == (255, 0, 0)),
    "animated GIF": (_animated, "first of 3 frames", lambda im: tuple(np.asarray(im)[5, 5]) == (255, 0, 0)),
    "EXIF orientation": (_exif_rotated, "EXIF orientation 6 applied", lambda im: im.size == (20, 40)),
    # only 2-8 are flips and rotations: other values are not applied, and not noted as applied
    **{f"EXIF orientation {n}": (_exif_orientation(n), f"EXIF orientation {n} ignored (not 1-8)", lambda im: im.size == (40, 20))
       for n in (0, 9, 65535)},
    "CMYK JPEG": (lambda p: Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, format="JPEG"), "",
                  lambda im: im.mode == "RGB" and np.asarray(im)[..., 0].mean() > 200),
    "greyscale": (lambda p: Image.new("L", (16, 16), 128).save(p), "", lambda im: tuple(np.asarray(im)[0, 0]) == (128, 128, 128)),
}


@pytest.mark.parametrize("case", list(HANDLED_IMAGES))
def test_unusual_images_are_read_on_purpose_and_noted(tmp_path, model_dirs, case):
    write, note, looks_right = HANDLED_IMAGES[case]
    folder = jsonl_folder(tmp_path, '{"file_name": "odd.png", "text": "a cat"}')
    write(folder / "odd.png")
    image, notes = read_image(folder / "odd.png")
    assert image.mode == "RGB" and looks_right(image)
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q"], 0, "run.h5")
    assert len(done_pairs(tmp_path)) == 3
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f["images/notes"].asstr()[2] == "; ".join(notes) == note
        assert tuple(f["images/original_size"][2]) == image.size


# --- configs -------------------------------------------------------------------------------------------------
BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
model: {name: x}
data: {format: [*g, *g, *g, *g]}
"""


def _edit(key: str, value: object) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        section, name = key.split(".")
        config[section][name] = value
    return edit


CONFIGS: dict[str, tuple[Callable[[Path], object], str]] = {
    "billion laughs": (lambda p: p.write_text(BILLION_LAUGHS), r"run.yaml:2: YAML aliases \(\*a\) are not allowed in run configs"),
    "over 1 MiB": (lambda p: p.write_text("# padding\n" * 120_000), r"run.yaml is 1200000 bytes; a run config is at most 1048576 bytes"),
    "not UTF-8": (lambda p: p.write_bytes(b"model: {name: caf\xe9}\n"), r"run.yaml: not UTF-8 text"),
    "a list": (lambda p: p.write_text("- model\n- data\n"), r"a run config is a mapping of sections"),
    "python tag": (lambda p: p.write_text("model: !!python/object:os.system {}\n"), r"run.yaml: invalid YAML: could not determine a constructor"),
    "misspelt key": (lambda p: p.write_text(p.read_text().replace("n_steps", "nsteps")), r"run.yaml:\d+: attribution.nsteps: unknown key; did you mean 'n_steps'\?"),
    "old key name": (lambda p: p.write_text(p.read_text().replace("n_steps", "steps")), r"attribution.steps: unknown key; did you mean 'n_steps'\?"),
    "huge n_steps": (_edit("attribution.n_steps", 100_000), r"run.yaml:\d+: attribution.n_steps: n_steps must be a whole number from 1 to 1024, got 100000"),
    "n_steps true": (_edit("attribution.n_steps", True), r"attribution.n_steps: Input should be a valid integer \(got True\)"),
    "batch size float": (_edit("runtime.batch_size", 2.5), r"runtime.batch_size: Input should be a valid integer"),
    "no tolerance, no steps": (_edit("attribution.n_steps", None), r"give a tolerance to adapt to, or n_steps for a fixed rule"),
    "huge bad value": (_edit("data.format", "x" * 5000), r"data.format: Input should be .* \(got 'xxxx.*\.\.\. \(5002 characters\)\)"),
    "bad shard": (_edit("runtime.shard_index", 3), r"runtime.shard_index 3 must be below runtime.num_shards 1"),
    "meta device": (_edit("model.device", "meta"), r"model.device 'meta' is not supported; use auto, cpu, cuda, cuda:N or mps"),
    "xpu device": (_edit("model.device", "xpu:0"), r"model.device 'xpu:0' is not supported"),
    "missing model dir": (_edit("model.name", "./checkpoints/mine"), r"no model directory at .*/checkpoints/mine \(model.name is relative to the config file .*run.yaml\)"),
    "model dir without config.json": (_edit("model.name", "images"), r".*/images holds no config.json, so it is not a transformers checkpoint: save one with save_pretrained \(model.name is relative to the config file .*run.yaml\)"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_is_exit_2_before_loading(tmp_path, model_dirs, case):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    path = write_config(tmp_path, model_dirs["clip"])
    change, message = CONFIGS[case]
    if change.__name__ == "edit":
        config = yaml.safe_load(path.read_text())
        change(config)
        path.write_text(yaml.safe_dump(config))
    else:
        change(path)
    output = expect(["attribute", path], 2, message)
    assert len(output) < 2000  # an offending value is quoted, not printed whole
    assert not (tmp_path / "run").exists()


# --- command-line overrides ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("attribution.n_steps=abc", r"command line override 'attribution.n_steps=abc': attribution.n_steps: Input should be a valid integer"),
        ("runtime.batch_size=0", r"command line override 'runtime.batch_size=0': runtime.batch_size: Input should be greater than or equal to 1"),
        ("attribution.n_step=3", r"command line override 'attribution.n_step=3': attribution.n_step: unknown key; did you mean 'n_steps'\?"),
        ("model.name.x=1", r"command line override 'model.name.x=1': model.name is not a section"),
        ("attribution.rule=&a [*a]", r"YAML aliases \(\*a\) are not allowed"),
        ("attribution.=3", r"override 'attribution.=3' must look like section.key=value"),
        ("attribution.n_steps=[1", r"override 'attribution.n_steps=\[1': the value is not valid YAML"),
    ],
)
def test_bad_override_names_the_command_line(tmp_path, model_dirs, override, message):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    output = expect(["attribute", write_config(tmp_path, model_dirs["clip"]), override], 2, message)
    assert "run.yaml:" not in output  # the value came from the command line, not from a line of the file


def test_overrides_are_typed_by_the_schema(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = load_config(write_config(tmp_path, model_dirs["clip"]), ["model.revision=1234567", "data.queries=[yes, no, 3]", "attribution.n_steps=5", "model.local_files_only=yes"])
    assert config.model.revision == "1234567" and config.data.queries == ["yes", "no", "3"]
    assert config.attribution.n_steps == 5 and config.model.local_files_only is True


SHARD_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                   "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "4"}, r"--shard env: SLURM_ARRAY_TASK_ID='abc' is not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "0"}, r"--shard env: SLURM_ARRAY_TASK_STEP='0' must be at least 1"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, r"--shard env: WORLD_SIZE='two' is not a whole number"),
    ],
)
def test_bad_shard_environment_is_exit_2(tmp_path, model_dirs, monkeypatch, variables, message):
    for name in SHARD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "--shard", "env"], 2, message)
    assert not (tmp_path / "run").exists()


# --- models ----------------------------------------------------------------------------------------------------
def _broken_model(tmp_path: Path, model_dirs: dict[str, str], value: float) -> str:
    model = xclip.load_model(model_dirs["clip"], device="cpu")
    with torch.no_grad():
        model.model.vision_model.encoder.layers[0].mlp.fc1.weight[0, 0] = value
    model.model.save_pretrained(tmp_path / "broken")
    model.processor.save_pretrained(tmp_path / "broken")
    return str(tmp_path / "broken")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_fail_the_items_with_the_reason(tmp_path, model_dirs, value):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = write_config(tmp_path, _broken_model(tmp_path, model_dirs, value))
    expect(["attribute", config, "-q", "--verbose"], 3,
           r"image 0: non-finite values in the image's results: the model's weights hold NaN or inf in vision_model.encoder.layers.0.mlp.fc1.weight")
    assert done_pairs(tmp_path) == []  # never "done" with NaN maps
    expect(["inspect", tmp_path / "run"], 0, r"failed pair 0: image 0 failed: non-finite values")


def test_hub_id_not_in_the_cache_offline(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = write_config(tmp_path, "nobody/no-such-clip")
    expect(["attribute", config], 1, r"cannot load model 'nobody/no-such-clip': it is not a local directory, and offline .* must already be in the Hugging Face cache")


def test_hub_id_without_network_says_how_to_fail_at_once(tmp_path, monkeypatch):
    # online, with no network: huggingface_hub retries for about 50 s before transformers gives up; the error then
    # says how to load from the cache at once. The hub's answer is planted as its client raises it, chained
    from huggingface_hub.errors import LocalEntryNotFoundError

    from xclip.models import hf

    class ConnectError(Exception):  # the HTTP client's (httpx or requests, by version): known by its name
        pass

    def unreachable(*args, **kwargs):
        try:
            try:
                raise ConnectError("[Errno -2] Name or service not known")
            except ConnectError as e:
                raise LocalEntryNotFoundError("cannot find the requested files in the disk cache") from e
        except LocalEntryNotFoundError as e:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from e

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf, "from_pretrained", unreachable)
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    output = expect(["attribute", write_config(tmp_path, "nobody/no-such-clip")], 1,
                    r"cannot load model 'nobody/no-such-clip': We couldn't connect .* without network set HF_HUB_OFFLINE=1 "
                    r"or model.local_files_only: true to load from the cache at once")
    assert "XCLIP_DEBUG" in output  # the message wraps the hub client's error: its traceback can help
    monkeypatch.setattr(hf, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("nobody/no-such-clip is not a repository")))
    output = expect(["attribute", write_config(tmp_path, "nobody/no-such-clip")], 1, r"is not a repository")
    assert "HF_HUB_OFFLINE" not in output  # reached, and answered: no hint about the network


def test_checkpoint_of_another_family(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    expect(["attribute", write_config(tmp_path, "bert")], 1, r"no adapter for model_type 'bert'")


def _header_length(length: int) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(struct.pack("<Q", length) + p.read_bytes()[8:])


def _one_token_fewer(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state["text_model.embeddings.token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"][:-1].clone()
    save_file(state, path, metadata={"format": "pt"})


def _pickled_bin(path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    path.unlink()
    torch.save({**state, "extra": np.random.default_rng(0)}, path.with_name("pytorch_model.bin"))  # not a tensor


DAMAGED_WEIGHTS: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  r"model.safetensors is not a readable safetensors file \(.*incomplete metadata.*\): it is truncated or damaged"),
    "empty": (lambda p: p.write_bytes(b""), r"model.safetensors \(empty, 0 bytes\) is not a readable safetensors file"),
    "header not JSON": (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json" + p.read_bytes()[8:]),
                        r"model.safetensors is not a readable safetensors file \(.*invalid JSON in header"),
    "huge header length": (_header_length(2**62), r"model.safetensors is not a readable safetensors file \(.*header too large"),
    "wrong shape": (_one_token_fewer, r"tensors in its weights do not have the shapes its config.json asks for: "
                    r"text_model.embeddings.token_embedding.weight is \[\d+, \d+\] in model.safetensors, \[\d+, \d+\] in config.json"),
    "pickled .bin": (_pickled_bin, r"pytorch_model.bin holds pickled objects that are not tensors, and xclip never loads those"),
}


@pytest.mark.parametrize("case", list(DAMAGED_WEIGHTS))
def test_damaged_weights_are_named(tmp_path, model_dirs, case):
    damage, message = DAMAGED_WEIGHTS[case]
    shutil.copytree(model_dirs["clip"], tmp_path / "damaged")
    damage(tmp_path / "damaged" / "model.safetensors")
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    output = expect(["attribute", write_config(tmp_path, str(tmp_path / "damaged"))], 1,
                    rf"cannot load model '{re.escape(str(tmp_path / 'damaged'))}': {re.escape(str(tmp_path / 'damaged'))}/.*{message}"
                    if case != "wrong shape" else rf"cannot load model '.*damaged': {message}")
    assert "weights_only=False" not in output  # never advise unpickling what could run code


# --- runs and run files ------------------------------------------------------------------------------------------
def test_refused_rerun_lists_what_differs(finished_run):
    config = finished_run.parent / "run.yaml"
    expect(["attribute", config, "attribution.n_steps=3", "model.dtype=float64"], 2,
           r"holds a run made with other settings \(stored -> now\): attribution.n_steps: 2 -> 3 model.dtype: \"float32\" -> \"float64\" rerun with the stored settings")


def _damage_group_tables(run_file: Path) -> None:
    """Overwrite the signatures of the file's group symbol tables, as a failing disk or a bad copy might."""
    data = run_file.read_bytes()
    assert data.count(b"SNOD") >= 2
    run_file.write_bytes(data.replace(b"SNOD", b"XXXX"))


@pytest.mark.parametrize("command", ["inspect", "render", "evaluate"])
def test_damaged_file_is_named(finished_run, tmp_path, command):
    _damage_group_tables(finished_run / "run.h5")
    annotations = tmp_path / "annotations.jsonl"
    annotations.write_text(json.dumps(ANNOTATION) + "\n")
    arguments = {"inspect": [], "render": ["--pair", "0"], "evaluate": ["-a", annotations]}[command]
    expect([command, finished_run, *arguments], 1, r"cannot read .*run.h5: the file is damaged")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_text("not hdf5"), r"cannot open .*run.h5"),
        (lambda p: p.unlink(), r"no run file at .*run.h5"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), r"cannot open .*run.h5 .*truncated"),
    ],
)
def test_unreadable_run_file(finished_run, damage, message):
    damage(finished_run / "run.h5")
    for command in ("inspect", "render"):
        # a missing file is a wrong path (usage, 2); a damaged one a fault of the file (1), whose message wraps
        # HDF5's error, so the traceback hint stays there only
        output = expect([command, finished_run], 2 if "no run file" in message else 1, message)
        assert ("XCLIP_DEBUG" in output) == ("no run file" not in message)


def test_run_file_of_another_schema_version(finished_run):
    with h5py.File(finished_run / "run.h5", "r+") as f:
        f.attrs["schema_version"] = 1
    expect(["inspect", finished_run], 1, rf"run.h5 has schema version 1, this xclip reads {SCHEMA_VERSION}")


def test_moved_images_are_named_and_found_again(finished_run, tmp_path):
    (tmp_path / "images").rename(tmp_path / "moved")
    expect(["render", finished_run, "--pair", "0"], 2, r"--data-root: image .*images/img0.png of pair 0 is not there: was the data moved\? give the images' new folder")
    expect(["render", finished_run, "--pair", "0", "--data-root", tmp_path / "moved"], 0, r"pair000000.png")


# --- command-line arguments ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--span", ""], r"--span is empty"),
        (["--span", "   "], r"--span is empty"),
        (["--box", "nan,0,5,5"], r"Error: --box 'nan,0,5,5': coordinates must be finite"),
        (["--box", "0,0,inf,5"], r"Error: --box '0,0,inf,5': coordinates must be finite"),
        (["--box", "1,2,3"], r"Error: --box must be x0,y0,x1,y1 in pixels, got '1,2,3'"),
        (["--box", "5,5,1,1"], r"need x0 < x1 and y0 < y1"),
        (["--box", "0,0,500,500"], r"--box 0,0,500,500 is not inside the image of pair 0 \(50 x 40 pixels\)"),
        (["--limit", "0"], r"Invalid value for '--limit': Input should be greater than or equal to 1"),
        (["--pair", "99"], r"pair 99 is not a finished pair of .*\(it has 3 pairs\)"),
        (["--upsample", "cubic"], r"upsample must be bilinear or nearest, got 'cubic'"),
        (["--span", "zebra", "--pair", "0"], r"span 'zebra' does not occur in the caption"),
        (["--span", "zebra"], r"no finished pair's caption holds the span 'zebra' \(3 finished pairs\)"),
        (["--scale", "0"], r"--scale must be figure, run or a positive number .*got '0'"),
        (["--scale", "nan"], r"--scale must be figure, run or a positive number .*got 'nan'"),
        (["--scale", "page"], r"--scale must be figure, run or a positive number .*got 'page'"),
        (["--format", "gif"], r"--format must be one of png, svg, pdf, got 'gif'"),
        (["--dpi", "5"], r"dpi must be between 30 and 600, got 5"),
    ],
)
def test_bad_render_arguments(finished_run, arguments, message):
    expect(["render", finished_run, *arguments], 2, message)
    assert not (finished_run / "heatmaps").exists()


ANNOTATION = {"image": "img0.png", "caption": "a red dog", "phrases": [{"text": "dog", "start": 6, "end": 9, "boxes": [[0, 0, 10, 10]]}]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"annotations.jsonl:1: invalid JSON"),
        ("3", r"annotations.jsonl:1: an annotation record is an object with image, caption and phrases"),
        (json.dumps({**ANNOTATION, "phrases": [{**ANNOTATION["phrases"][0], "start": 5}]}), r"annotations.jsonl:1: span 5:9 of the caption is not 'dog'"),
        (json.dumps({**ANNOTATION, "phrases": [{**ANNOTATION["phrases"][0], "boxes": [[0, 0, float("nan"), 3]]}]}), r"a box is four finite numbers"),
        (json.dumps({**ANNOTATION, "phrases": [{**ANNOTATION["phrases"][0], "boxes": [[9, 0, 1, 3]]}]}), r"needs x0 < x1 and y0 < y1"),
        (json.dumps({**ANNOTATION, "phrases": [{**ANNOTATION["phrases"][0], "boxes": []}]}), r"phrase 'dog' has no box"),
    ],
)
def test_bad_annotations(finished_run, tmp_path, line, message):
    (tmp_path / "annotations.jsonl").write_text(line + "\n")
    expect(["evaluate", finished_run, "-a", tmp_path / "annotations.jsonl"], 2, message)


def test_missing_annotations_file(finished_run, tmp_path):
    expect(["evaluate", finished_run, "-a", tmp_path / "nope.jsonl"], 2, r"annotations file .*nope.jsonl does not exist")


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["synth", "{tmp}/s", "--n", "0"], 2, r"Invalid value for '--n': Input should be greater than or equal to 1"),
        (["synth", "{tmp}/s", "--size", "4"], 2, r"Invalid value for '--size': Input should be greater than or equal to 32"),
        (["convert", "coco-instances", "{tmp}/bad.json", "{tmp}/out", "--captions", "{tmp}/bad.json"], 2, r"bad.json:1: the COCO instances file is not valid JSON"),
        (["convert", "coco-instances", "{tmp}/list.json", "{tmp}/out", "--captions", "{tmp}/list.json"], 2, r"list.json: the COCO instances file must be a JSON object"),
        (["convert", "coco-instances", "{tmp}/partial.json", "{tmp}/out", "--captions", "{tmp}/partial.json"], 2, r"partial.json: not a COCO instances file"),
        (["convert", "coco-instances", "{tmp}/partial.json", "{tmp}/out"], 2, r"coco-instances needs --captions"),
        (["convert", "flickr30k-entities", "{tmp}/flickr", "{tmp}/out"], 2, r"123.xml: not a Flickr30k Entities annotation"),
        (["convert", "flickr30k-entities", "{tmp}/flickr", "{tmp}/out", "--split", "test"], 2, r"cannot read the 'test' split file .*test.txt"),
        (["convert", "imagenet", "{tmp}/flickr", "{tmp}/out"], 2, r"unknown kind 'imagenet'"),
        (["convert", "flickr30k-entities", "{tmp}/empty", "{tmp}/out"], 2, r"nothing to convert: .*empty/Sentences holds no .txt files"),
        (["convert", "flickr30k-entities", "{tmp}/unboxed", "{tmp}/out"], 2, r"nothing to convert: 1 caption\(s\) read, none with a grounded phrase, from .*unboxed/Annotations"),
        (["convert", "flickr30k-entities", "{tmp}/nowhere", "{tmp}/out"], 2, r"nowhere must contain the Flickr30k Entities folders Sentences/ and Annotations/"),
        (["convert", "coco-instances", "{tmp}/no-instances.json", "{tmp}/out", "--captions", "{tmp}/no-captions.json"], 2, r"nothing to convert: 0 caption\(s\) read"),
        (["merge", "{tmp}"], 1, r"no shard-\*-of-\*/run.h5 under"),
        (["inspect", "{tmp}", "--top", "-1"], 2, r"Invalid value for '--top'"),
        (["attribute", "{tmp}/run.yaml", "--shard", "3"], 2, r"--shard must be I/N \(such as 3/32\) or env, got '3'"),
        (["attribute", "{tmp}/run.yaml", "--shard", "2/2"], 2, r"runtime.shard_index 2 must be below runtime.num_shards 2"),
        (["attribute", "{tmp}/nope.yaml"], 2, r"cannot read config .*nope.yaml: No such file or directory"),
    ],
)
def test_bad_cli_arguments(tmp_path, model_dirs, arguments, code, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "partial.json").write_text(json.dumps({"images": [{"id": 1}], "categories": [], "annotations": []}))
    for folder in ("Sentences", "Annotations"):
        (tmp_path / "flickr" / folder).mkdir(parents=True)
    (tmp_path / "flickr" / "Sentences" / "123.txt").write_text("[/EN#1/people A man] runs\n")
    (tmp_path / "flickr" / "Annotations" / "123.xml").write_text("<annotation><object>")
    for folder in ("empty", "unboxed"):
        for part in ("Sentences", "Annotations"):
            (tmp_path / folder / part).mkdir(parents=True)
    (tmp_path / "unboxed" / "Sentences" / "123.txt").write_text("[/EN#1/people A man] runs\n")  # no 123.xml
    (tmp_path / "no-captions.json").write_text(json.dumps({"annotations": []}))
    (tmp_path / "no-instances.json").write_text(json.dumps({"images": [], "categories": [], "annotations": []}))
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    write_config(tmp_path, model_dirs["clip"])
    expect([a.replace("{tmp}", str(tmp_path)) for a in arguments], code, message)


def test_merge_refuses_a_missing_shard(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    assert invoke("attribute", write_config(tmp_path, model_dirs["clip"]), "--shard", "0/2", "-q")[0] == 0
    expect(["merge", tmp_path / "run"], 1, r"has 1 of 2 shards; run the missing ones first")


# --- failures that are not the input's ----------------------------------------------------------------------------
def test_out_of_memory_names_the_memory_knobs(tmp_path, model_dirs, monkeypatch):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(xclip.InteractionAttribution, "image_batch_contributions", no_memory)
    expect(["attribute", write_config(tmp_path, model_dirs["clip"]), "-q"], 1,
           r"out of memory: lower runtime.internal_batch_size \(or runtime.batch_size\) and rerun to resume")
    assert done_pairs(tmp_path) == []


def test_a_bug_is_not_recorded_as_a_bad_image(tmp_path, model_dirs, monkeypatch):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')

    def bug(path):
        raise TypeError("a bug in xclip")

    monkeypatch.setattr("xclip.models.base.read_image", bug)
    result = runner.invoke(app, ["attribute", str(write_config(tmp_path, model_dirs["clip"])), "-q"])
    assert isinstance(result.exception, TypeError)  # surfaces with its traceback; no image is marked failed
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert (f["images/status"][:] == 0).all()


def test_xclip_debug_shows_the_traceback(tmp_path, model_dirs, monkeypatch):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = write_config(tmp_path, "./missing")
    monkeypatch.setenv("XCLIP_DEBUG", "1")
    result = runner.invoke(app, ["attribute", str(config)])
    assert isinstance(result.exception, xclip.ConfigError) and "no model directory" in str(result.exception)


def test_signal_handlers_are_restored_and_two_signals_exit_75(tmp_path, model_dirs, monkeypatch):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def two_signals(config, *, should_stop, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)  # the second one stops at once
        raise AssertionError("not reached")

    monkeypatch.setattr("xclip.run.runner.run", two_signals)
    expect(["attribute", write_config(tmp_path, model_dirs["clip"])], 75, r"stopped by a second signal .* rerun the same command")
    assert {sig: signal.getsignal(sig) for sig in before} == before


# --- the library API ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_steps": 0}, r"n_steps must be a whole number from 1 to 1024, got 0"),
        ({"n_steps": 2.5}, r"n_steps must be a whole number from 1 to 1024, got 2.5"),
        ({"max_steps": 100_000}, r"max_steps must be a whole number from 1 to 4096"),
        ({"mode": "sideways"}, r"unknown mode 'sideways'; choose one of auto, forward, reverse"),
        ({"internal_batch_size": 0}, r"internal_batch_size must be a whole number of at least 1, got 0"),
        ({"text_layer": 1.0}, r"text_layer must be a whole number, got 1.0"),
        ({"text_filler": 10**9}, r"text_filler 1000000000 is not a token id of this tokenizer"),
        ({"blur_radius": math.nan}, r"blur_radius must be a positive number of pixels, got nan"),
        ({"image_reference": "grey"}, r"unknown image_reference 'grey'"),
        ({"scale_by_logit": "yes"}, r"scale_by_logit must be true or false"),
    ],
)
def test_api_settings_are_checked_at_construction(model32, settings, message):
    with pytest.raises(xclip.ConfigError, match=message):
        xclip.InteractionAttribution(model32, **settings)


@pytest.mark.parametrize("name", ["text_layer", "n_steps", "rule", "tolerance", "mode", "model", "internal_batch_size"])
def test_api_settings_are_read_only(model32, name):
    attributor = xclip.InteractionAttribution(model32, n_steps=4)
    before = attributor.text_contributions(["a red dog"])[0].values
    with pytest.raises(AttributeError, match="fixed at construction"):
        setattr(attributor, name, 0)
    torch.testing.assert_close(attributor.text_contributions(["a red dog"])[0].values, before, rtol=0, atol=0)


def test_api_and_config_share_setting_names():
    import inspect

    from xclip.config import AttributionConfig

    parameters = set(inspect.signature(xclip.InteractionAttribution).parameters) - {"model", "settings", "internal_batch_size"}
    assert parameters == set(AttributionConfig.model_fields)


# --- the command line page says what happens -----------------------------------------------------------------------
def test_documented_exit_codes_and_error_examples_are_real(tmp_path, model_dirs):
    table = section("docs/cli.md", "Exit codes")
    assert [int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.M)] == [
        EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED
    ]
    (block,) = code_blocks(section("docs/cli.md", "Bad input"), "text")
    examples = re.findall(r"^\$ (.*)\n((?:[^$].*\n)+)", block, flags=re.M)
    assert len(examples) == 4
    # the folder the examples describe: an empty caption on line 3, an image file that is not an image
    folder = jsonl_folder(tmp_path, '{"file_name": "bad.png", "text": "   "}')
    with (folder / "metadata.jsonl").open("a") as stream:
        stream.write('{"file_name": "bad.png", "text": "a cat"}\n')
    (folder / "bad.png").write_text("hello")
    config = write_config(tmp_path, model_dirs["clip"])
    for command, expected in examples:
        arguments = [str(config) if a == "run.yaml" else a for a in shlex.split(command)[1:]]
        output = invoke(*arguments)[1].replace(str(tmp_path), "<dir>")
        for line in expected.splitlines():
            assert line in output.splitlines(), f"docs/cli.md line {line!r} is not what `{command}` prints:\n{output}"
