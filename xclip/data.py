"""Input formats users of CLIP tooling already have, read into captions, images and (caption, image) pairs."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from xclip.config import DataConfig
from xclip.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass(frozen=True)
class Dataset:
    """Unique captions and images, and the pairs the metadata names, as (caption index, image index)."""

    captions: list[str]
    images: list[Path]
    given_pairs: list[tuple[int, int]]


class _Builder:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.captions: dict[str, int] = {}
        self.images: dict[Path, int] = {}
        self.pairs: list[tuple[int, int]] = []

    def image(self, relative: str, where: str) -> int:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            msg = f"{where}: image path {relative!r} escapes the data root {self.root}"
            raise ConfigError(msg)
        return self.images.setdefault(path, len(self.images))

    def add(self, relative_image: str, caption: str, where: str) -> None:
        image = self.image(relative_image, where)
        text = self.captions.setdefault(caption, len(self.captions))
        if (text, image) not in self.pairs:
            self.pairs.append((text, image))

    def build(self, limit: int | None) -> Dataset:
        pairs = self.pairs[:limit] if limit else self.pairs
        return Dataset(captions=list(self.captions), images=list(self.images), given_pairs=pairs)


def _captions_of(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    msg = f"{where}: caption must be a string or a list of strings, got {type(value).__name__}"
    raise ConfigError(msg)


def read_dataset(config: DataConfig) -> Dataset:
    """Read the configured input into a :class:`Dataset`; raises :class:`ConfigError` naming file and line.

    Formats: ``imagefolder`` (``metadata.jsonl`` with ``file_name`` and ``text``), ``csv`` (path and caption
    columns), ``sidecar`` (``name.txt`` next to each image, one caption per line), ``coco`` (COCO captions JSON),
    ``queries`` (``data.queries`` crossed with every image under the root).
    """
    root = config.root
    if not root.is_dir():
        msg = f"data.root {root} is not a folder"
        raise ConfigError(msg)
    builder = _Builder(root)
    metadata = config.metadata
    if config.format in ("imagefolder", "csv", "coco") and (metadata is None or not metadata.is_file()):
        msg = f"data.metadata {metadata} does not exist"
        raise ConfigError(msg)
    if config.format == "imagefolder":
        assert metadata is not None
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{where}: invalid JSON: {e.msg}"
                raise ConfigError(msg) from e
            if "file_name" not in record or "text" not in record:
                msg = f"{where}: each line needs 'file_name' and 'text'"
                raise ConfigError(msg)
            for caption in _captions_of(record["text"], where):
                builder.add(record["file_name"], caption, where)
    elif config.format == "csv":
        assert metadata is not None
        with metadata.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter=config.csv_separator)
            missing = {config.csv_image_key, config.csv_caption_key} - set(reader.fieldnames or [])
            if missing:
                msg = f"{metadata}: missing column(s) {', '.join(sorted(missing))}; found {reader.fieldnames}"
                raise ConfigError(msg)
            for number, row in enumerate(reader, start=2):
                builder.add(row[config.csv_image_key], row[config.csv_caption_key], f"{metadata}:{number}")
    elif config.format == "coco":
        assert metadata is not None
        try:
            coco = json.loads(metadata.read_text())
            files = {image["id"]: image["file_name"] for image in coco["images"]}
            annotations = [(a["image_id"], a["caption"]) for a in coco["annotations"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            msg = f"{metadata}: not a COCO captions file (images[].id/file_name, annotations[].image_id/caption): {e}"
            raise ConfigError(msg) from e
        for image_id, caption in sorted(annotations, key=lambda a: (str(files.get(a[0], "")), a[1])):
            if image_id not in files:
                msg = f"{metadata}: annotation refers to unknown image_id {image_id}"
                raise ConfigError(msg)
            builder.add(files[image_id], caption.strip(), f"{metadata} image_id {image_id}")
    elif config.format == "sidecar":
        for image in _image_files(root):
            sidecar = image.with_suffix(".txt")
            if sidecar.is_file():
                for caption in filter(None, (line.strip() for line in sidecar.read_text().splitlines())):
                    builder.add(str(image.relative_to(root)), caption, str(sidecar))
    elif config.format == "queries":
        for image in _image_files(root):
            builder.image(str(image.relative_to(root)), str(root))
        for query in config.queries:
            builder.captions.setdefault(query, len(builder.captions))
        builder.pairs = [(c, i) for c in range(len(builder.captions)) for i in range(len(builder.images))]
    dataset = builder.build(config.limit)
    if not dataset.images or not dataset.captions:
        msg = f"no image-caption pairs found for data.format {config.format!r} under {root}"
        raise ConfigError(msg)
    return dataset


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root`` in a canonical (sorted) order, never the file system's."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
