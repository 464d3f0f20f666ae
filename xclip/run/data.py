"""Input formats users of CLIP tooling already have, read into captions, images and (caption, image) pairs.

Every record is checked before a model loads. A record that names no usable caption-image pair (invalid JSON,
a wrong type, an empty caption, bytes that are not UTF-8, a short CSV row) is *rejected*: it is reported with
its file and line (a sample of a tar or parquet file: its file and key), and the run goes on with the other
records. A file that cannot be read at all (missing, not UTF-8 where the whole file must be, an unterminated CSV
quote, not COCO) is a :class:`ConfigError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xclip.models.base import text_problem
from xclip.config import SHARDED_FORMATS, DataConfig
from xclip.errors import ConfigError
from xclip.disk.archives import IMAGE_SUFFIXES
from xclip.disk.textfiles import read_text, text_lines
from xclip.run.shards import Rejected, Sample, plan_shard, read_samples


@dataclass(frozen=True)
class Dataset:
    """Unique captions and images, the pairs the metadata names (caption index, image index), and the records
    that were rejected, as ``file:line: reason``."""

    captions: list[str]
    images: list[Path]
    given_pairs: list[tuple[int, int]] | np.ndarray
    rejected: list[str] = field(default_factory=list)
    shard_files: ShardFiles | None = None  # webdataset and parquet inputs: the files this shard read

    def digest(self, root: Path) -> str:
        """SHA-256 of what the data files say (captions, image paths relative to ``root``, pairs): equal for the
        same files wherever they lie, different after any edit that changes a caption, a path or a pair."""
        images = [str(path.relative_to(root.resolve())) for path in self.images]
        pairs = np.asarray(self.given_pairs, dtype=np.int64).tolist()
        return hashlib.sha256(json.dumps([self.captions, images, pairs]).encode()).hexdigest()


@dataclass(frozen=True)
class ShardFiles:
    """The whole files of a webdataset or parquet input that one shard of a run read (see :mod:`xclip.run.shards`),
    and what identifies them."""

    names: list[str]  # this shard's files, relative to the data root
    all_sha256: str  # every file of the input: names and sizes (equal in every shard of a run)
    own_sha256: str  # this shard's files' samples: keys, captions, member paths and rejections, file by file


class _Builder:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.captions: dict[str, int] = {}
        self.images: dict[Path, int] = {}
        self.pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set
        self.rejected: list[str] = []

    def reject(self, where: str, reason: str) -> None:
        self.rejected.append(f"{where}: {reason}")

    def image(self, relative: str, where: str) -> int:
        """The image's index; an image path outside the data root is refused outright (a config that reaches
        out of its data root is not a bad record but a bad config). A symlink loop resolves as far as it goes (as
        Python >= 3.13 does): reading the image then fails that image alone, naming the loop."""
        try:
            path = (self.root / relative).resolve()
        except RuntimeError:  # Python < 3.13 raises on a symlink loop
            path = Path(os.path.realpath(self.root / relative))
        if not path.is_relative_to(self.root):
            msg = f"{where}: image path {relative!r} escapes the data root {self.root}"
            raise ConfigError(msg)
        return self.images.setdefault(path, len(self.images))

    def add(self, relative_image: object, caption: object, where: str, fields: tuple[str, str] = ("the image path", "the caption")) -> None:
        """One pair, or its rejection; ``fields`` name the image path and the caption in messages (the file's
        own names). Neither the image nor the caption is kept when the other is rejected."""
        problems = [p for p in (_path_problem(relative_image, fields[0]), text_problem(caption, fields[1])) if p]
        for problem in problems:
            self.reject(where, problem)
        if problems:
            return
        assert isinstance(relative_image, str) and isinstance(caption, str)
        image = self.image(relative_image, where)
        text = self.captions.setdefault(caption, len(self.captions))
        self.pairs.setdefault((text, image))

    def sample(self, sample: Sample) -> None:
        """One sample of a tar or parquet file: its own image (a member path, taken as it is: the file was found
        under the root), its caption."""
        problem = text_problem(sample.caption)
        if problem is not None:
            self.reject(sample.where, problem)
            return
        image = self.images.setdefault(self.root / sample.image, len(self.images))
        text = self.captions.setdefault(sample.caption, len(self.captions))
        self.pairs.setdefault((text, image))

    def build(self, shard_files: ShardFiles | None = None) -> Dataset:
        pairs = list(self.pairs)
        return Dataset(
            captions=list(self.captions), images=list(self.images), given_pairs=pairs,
            rejected=self.rejected, shard_files=shard_files,
        )


def _path_problem(relative: object, field: str) -> str | None:
    if not isinstance(relative, str):
        return f"{field} must be a string, got {_type_name(relative)}"
    if not relative.strip():
        return f"{field} is empty"
    return text_problem(relative, field)


def _type_name(value: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _read_imagefolder(metadata: Path, builder: _Builder) -> None:
    for number, line, problem in text_lines(metadata, "data.metadata"):
        where = f"{metadata}:{number}"
        if line is None:
            builder.reject(where, problem)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            builder.reject(where, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(record, dict):
            builder.reject(where, f"a record must be a JSON object with 'file_name' and 'text', got {_type_name(record)}")
            continue
        missing = [key for key in ("file_name", "text") if key not in record]
        if missing:
            builder.reject(where, f"the record has no {' or '.join(repr(k) for k in missing)}")
            continue
        texts = record["text"]
        if isinstance(texts, list):
            if not texts:
                builder.reject(where, "'text' is an empty list")
            for k, caption in enumerate(texts):
                builder.add(record["file_name"], caption, where, ("'file_name'", f"'text'[{k}]"))
        else:
            builder.add(record["file_name"], texts, where, ("'file_name'", "'text'"))


def _read_csv(config: DataConfig, metadata: Path, builder: _Builder) -> None:
    text = read_text(metadata, "data.metadata")
    # strict: an unterminated quote is an error, not a field that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=config.csv_separator, strict=True)
    first = 1
    try:
        header = next(reader, None)
        if header is None:
            msg = f"{metadata}: the file is empty; it needs a header row with {config.csv_image_key!r} and {config.csv_caption_key!r}"
            raise ConfigError(msg)
        missing = {config.csv_image_key, config.csv_caption_key} - set(header)
        if missing:
            msg = f"{metadata}: missing column(s) {', '.join(sorted(missing))}; found {header}"
            raise ConfigError(msg)
        image_column, caption_column = header.index(config.csv_image_key), header.index(config.csv_caption_key)
        first = reader.line_num + 1
        for row in reader:
            where = f"{metadata}:{first}"
            first = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                builder.reject(where, f"the row has {len(row)} field(s), the header {len(header)}")
                continue
            builder.add(row[image_column], row[caption_column], where, (f"column {config.csv_image_key!r}", f"column {config.csv_caption_key!r}"))
    except csv.Error as e:
        msg = f"{metadata}:{first}: cannot parse the CSV from this line on ({e}); check its quotes"
        raise ConfigError(msg) from None


def _read_coco(metadata: Path, builder: _Builder) -> None:
    try:
        coco = json.loads(read_text(metadata, "data.metadata"))
        images, annotations = coco["images"], coco["annotations"]
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise TypeError("images and annotations must be lists")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        msg = f"{metadata}: not a COCO captions file (images[].id/file_name, annotations[].image_id/caption): {e}"
        raise ConfigError(msg) from None
    files: dict[object, object] = {}
    for k, image in enumerate(images):
        if isinstance(image, dict) and "id" in image and "file_name" in image and isinstance(image["id"], (int, str)):
            files[image["id"]] = image["file_name"]
        else:
            builder.reject(f"{metadata} images[{k}]", "an image entry needs 'id' and 'file_name'")
    records = []
    for k, annotation in enumerate(annotations):
        where = f"{metadata} annotations[{k}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            builder.reject(where, "an annotation needs 'image_id' and 'caption'")
        elif not isinstance(annotation["image_id"], (int, str)) or annotation["image_id"] not in files:
            builder.reject(where, f"image_id {annotation['image_id']!r} is not an id of the file's images")
        else:
            caption = annotation["caption"]
            records.append((str(files[annotation["image_id"]]), caption.strip() if isinstance(caption, str) else caption, where))
    for file_name, caption, where in sorted(records, key=lambda r: (r[0], str(r[1]))):
        builder.add(file_name, caption, where, ("the image's 'file_name'", "'caption'"))


def _read_sidecar(root: Path, builder: _Builder) -> None:
    for image in _image_files(root):
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            for number, line, problem in text_lines(sidecar, "caption file"):
                where = f"{sidecar}:{number}"
                if line is None:
                    builder.reject(where, problem)
                else:
                    builder.add(str(image.relative_to(root)), line.strip(), where)


def _read_queries(config: DataConfig, builder: _Builder) -> None:
    for k, query in enumerate(config.queries):
        problem = text_problem(query, "the query")
        if problem is not None:
            msg = f"data.queries[{k}]: {problem}"
            raise ConfigError(msg)
    for image in _image_files(config.root):
        builder.image(str(image.relative_to(config.root)), str(config.root))
    for query in config.queries:
        builder.captions.setdefault(query, len(builder.captions))
    builder.pairs = {(c, i): None for c in range(len(builder.captions)) for i in range(len(builder.images))}


def _read_shard_files(config: DataConfig, shard: tuple[int, int], builder: _Builder) -> ShardFiles:
    """The samples of this shard's whole files (see :mod:`xclip.run.shards`), each file's digested as it is read."""
    plan = plan_shard(config, *shard)
    own = hashlib.sha256()
    for file, name in zip(plan.own, plan.names(plan.own)):
        digest = hashlib.sha256()
        for item in read_samples(file, plan.root):
            if isinstance(item, Rejected):
                builder.reject(item.where, item.reason)
                digest.update(json.dumps(["rejected", item.where, item.reason]).encode())
            else:
                builder.sample(item)
                digest.update(json.dumps([item.where, item.image, item.caption]).encode())
        own.update(json.dumps([name, digest.hexdigest()]).encode())
    return ShardFiles(plan.names(plan.own), plan.files_digest(), own.hexdigest())


def read_dataset(config: DataConfig, shard: tuple[int, int] = (0, 1)) -> Dataset:
    """Read the configured input into a :class:`Dataset`.

    Formats: ``imagefolder`` (``metadata.jsonl`` with ``file_name`` and ``text``), ``csv`` (path and caption
    columns), ``sidecar`` (``name.txt`` next to each image, one caption per line), ``coco`` (COCO captions JSON),
    ``queries`` (``data.queries`` crossed with every image under the root), ``webdataset`` (tar shards) and
    ``parquet`` (img2dataset's parquet with image bytes): of these two only the files of ``shard`` (index, number of
    shards) are read, whole (see :mod:`xclip.run.shards`).

    Raises:
        ConfigError: a data file that cannot be read at all, an image path outside the data root, or no pair
            left; the message names the file and line.
    """
    root = config.root
    if not root.is_dir():
        msg = f"data.root {root} is not a folder"
        raise ConfigError(msg)
    builder = _Builder(root)
    metadata = config.metadata
    if config.format in ("imagefolder", "csv", "coco") and (metadata is None or not metadata.is_file()):
        msg = f"data.metadata {metadata} is not a file"
        raise ConfigError(msg)
    if config.format == "imagefolder":
        assert metadata is not None
        _read_imagefolder(metadata, builder)
    elif config.format == "csv":
        assert metadata is not None
        _read_csv(config, metadata, builder)
    elif config.format == "coco":
        assert metadata is not None
        _read_coco(metadata, builder)
    elif config.format == "sidecar":
        _read_sidecar(root, builder)
    elif config.format == "queries":
        _read_queries(config, builder)
    shard_files = _read_shard_files(config, shard, builder) if config.format in SHARDED_FORMATS else None
    dataset = builder.build(shard_files)
    if not dataset.given_pairs:
        rejected = "".join(f"\n  {line}" for line in dataset.rejected[:10])
        more = f"\n  ... and {len(dataset.rejected) - 10} more" if len(dataset.rejected) > 10 else ""
        where = f"under {root}"
        if shard_files is not None:
            other_files = f" and {len(shard_files.names) - 3} more" if len(shard_files.names) > 3 else ""
            where = f"in {', '.join(shard_files.names[:3])}{other_files}"
        msg = f"no image-caption pairs found for data.format {config.format!r} {where}" + (
            f"; every record was rejected:{rejected}{more}" if dataset.rejected else ""
        )
        raise ConfigError(msg)
    return dataset


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root`` in a canonical (sorted) order, never the file system's."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
