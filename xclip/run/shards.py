"""WebDataset tar shards and img2dataset parquet files read directly: which files a shard of a run reads, what
identifies them, and each file's samples, every damaged one named by its key.

A run's shards (``--shard i/N``) take whole files, in contiguous blocks of the file list as the patterns expand
(in order, brace ranges in their order, glob matches sorted): a shard reads only its own files, so its memory
does not grow with the whole dataset. Each sample is one pair: its caption and its image, stored as a member
path (``part-00000.tar/000000001.jpg``, ``part-00000.parquet/000000001.jpg``: see :mod:`xclip.disk.archives`)
relative to ``data.root``. Only the captions are read here; the images are decoded later, in the run's
DataLoader workers.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from xclip.config import DataConfig
from xclip.disk.archives import (
    IMAGE_SUFFIXES, PARQUET_IMAGE_COLUMNS, ArchiveMembers, TarMember, list_tar, sample_key, split_member_path,
)
from xclip.errors import ConfigError, InputError

_PARQUET_BATCH_ROWS = 4096  # captions read at a time from a parquet file


@dataclass(frozen=True)
class Sample:
    """A sample with a caption and an image: one pair."""

    where: str  # ``FILE: KEY``, as its rejection would name it
    image: str  # member path relative to the data root
    caption: str


@dataclass(frozen=True)
class Rejected:
    """A sample (or a whole file) that names no usable pair."""

    where: str
    reason: str


@dataclass(frozen=True)
class ShardPlan:
    """The files of a run's input and the block of them one shard reads."""

    root: Path
    files: list[Path]  # every file the patterns name, in order
    own: list[Path]  # this shard's contiguous block of them

    def names(self, files: list[Path]) -> list[str]:
        return [file.relative_to(self.root).as_posix() for file in files]

    def files_digest(self) -> str:
        """SHA-256 of every file's name (relative to the root) and size: equal in every shard of a run (one stat
        per file, nothing read), different when a file is added, removed, renamed or changes size."""
        listing = [[name, file.stat().st_size] for name, file in zip(self.names(self.files), self.files)]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def plan_shard(config: DataConfig, shard_index: int = 0, num_shards: int = 1) -> ShardPlan:
    """The files ``data.shards`` or ``data.files`` name, and shard ``shard_index``'s contiguous block of them.

    Raises:
        ConfigError: a pattern that names no file, a file outside ``data.root``, or more shards than files.
    """
    key = "shards" if config.format == "webdataset" else "files"
    root = config.root.resolve()
    files = expand_patterns(getattr(config, key), f"data.{key}")
    for file in files:
        if not file.is_relative_to(root):
            msg = f"data.{key}: {file} lies outside data.root {root}; set data.root to a folder holding every file"
            raise ConfigError(msg)
    if num_shards > len(files):
        msg = (f"runtime.num_shards {num_shards} exceeds the {len(files)} file(s) of data.{key}: each shard reads whole "
               f"files, so split the run into at most {len(files)} shards")
        raise ConfigError(msg)
    return ShardPlan(root, files, files[contiguous_block(len(files), shard_index, num_shards)])


def contiguous_block(n_items: int, index: int, count: int) -> slice:
    """Block ``index`` of ``count`` contiguous blocks of ``n_items`` items: sizes differ by one at most, the first
    blocks taking the extra items (how shards split pairs, and files of webdataset and parquet inputs)."""
    size, extra = divmod(n_items, count)
    start = index * size + min(index, extra)
    return slice(start, start + size + (index < extra))


def expand_patterns(patterns: list[str], key: str) -> list[Path]:
    """Files named by paths and patterns: brace notation (``part-{00000..00999}.tar``, ``{a,b}``) expanded in its
    order, then glob characters (``*?[``) matched in sorted order; a file named twice is kept at its first place.

    Raises:
        ConfigError: a path that is not a file, or a glob that matches none.
    """
    files: dict[Path, None] = {}
    missing: list[str] = []
    for pattern in patterns:
        for name in braceexpand(pattern):
            if glob.has_magic(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    missing.append(f"{name} (matches no file)")
                files.update((Path(match).resolve(), None) for match in matches if Path(match).is_file())
            elif Path(name).is_file():
                files.setdefault(Path(name).resolve())
            else:
                missing.append(name)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        msg = f"{key}: not a file: {', '.join(missing[:5])}{more}"
        raise ConfigError(msg)
    if not files:
        msg = f"{key} names no file"
        raise ConfigError(msg)
    return list(files)


def read_samples(file: Path, root: Path) -> Iterator[Sample | Rejected]:
    """The samples of one tar or parquet file, in file order, each damaged one rejected by key.

    Raises:
        ConfigError: a parquet file without image bytes (img2dataset's URL list) or without captions.
    """
    name = file.relative_to(root).as_posix()
    if file.suffix.lower() == ".parquet":
        yield from _parquet_samples(file, name)
    else:
        yield from _tar_samples(file, name)


def _tar_samples(file: Path, name: str) -> Iterator[Sample | Rejected]:
    """A tar's samples, grouped by key as WebDataset groups them: ``KEY.txt`` is the caption (UTF-8), the first
    ``KEY.<image extension>`` the image, ``KEY.json`` the metadata (see :func:`sample_metadata`)."""
    try:
        listing = list_tar(file)
    except (InputError, OSError) as e:
        yield Rejected(name, f"the whole file is unreadable: {e}")
        return
    samples: dict[str, dict[str, TarMember]] = {}
    for member in listing.members:
        key, extension = sample_key(member.name)
        samples.setdefault(key, {}).setdefault(extension.lower(), member)
    cut_key = None if listing.cut is None else sample_key(listing.cut.name)[0]
    with file.open("rb") as stream:
        for key, members in samples.items():
            where = f"{name}: {key}"
            if key == cut_key:
                continue  # named below, once, as the sample the file's end cuts
            image = next((m for extension, m in members.items() if f".{extension}" in IMAGE_SUFFIXES), None)
            caption = members.get("txt")
            if image is None:
                found = ", ".join(f".{extension}" for extension in members) or "nothing"
                yield Rejected(where, f"no image ({found} only)")
            elif caption is None:
                yield Rejected(where, "no caption (.txt)")
            else:
                stream.seek(caption.offset)
                raw = stream.read(caption.size)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Rejected(where, f"the caption (.txt) is not UTF-8 (byte {e.start}: {e.reason})")
                    continue
                yield Sample(where, f"{name}/{image.name}", text.strip())
    if listing.cut is not None:
        cut = listing.cut
        yield Rejected(f"{name}: {cut_key}", f"the file ends inside {cut.name} (truncated tar: samples after it are lost)")
    elif listing.damage is not None:
        yield Rejected(name, f"{listing.damage}: samples after it, if any, are lost")


def _parquet_samples(file: Path, name: str) -> Iterator[Sample | Rejected]:
    """A parquet file's rows: ``key``, the caption ``txt``, the image bytes in ``jpg`` (or ``png``, ``webp``,
    ``image``); a row whose ``status`` is not ``success`` is rejected with its ``error_message``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as e:
        yield Rejected(name, f"the whole file is unreadable as parquet: {e}")
        return
    with parquet:
        schema = parquet.schema_arrow
        binary = [c for c in schema.names if pa.types.is_binary(schema.field(c).type) or pa.types.is_large_binary(schema.field(c).type)]
        image_column = next((c for c in PARQUET_IMAGE_COLUMNS if c in binary), None)
        if image_column is None:
            url = next((c for c in schema.names if c.lower() == "url"), None)
            hint = (f" (only image addresses, in {url!r}): download the images first, with img2dataset --url_list "
                    f"{file.name} --input_format parquet --url_col {url} --caption_col CAPTION_COLUMN --output_format "
                    "parquet, and read what it writes" if url is not None else "")
            msg = f"{file} holds no image bytes: none of the columns {', '.join(PARQUET_IMAGE_COLUMNS)} is binary{hint}"
            raise ConfigError(msg)
        for needed in ("key", "txt"):
            if needed not in schema.names:
                msg = f"{file} has no {needed!r} column (img2dataset's parquet has key, txt and {image_column})"
                raise ConfigError(msg)
        columns = [c for c in ("key", "txt", "status", "error_message") if c in schema.names]
        seen: set[str] = set()
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                rows = batch.to_pydict()
                for k in range(batch.num_rows):
                    row = {column: rows[column][k] for column in columns}
                    key = str(row["key"])
                    where = f"{name}: {key}"
                    if key in seen:
                        yield Rejected(where, "the key is used by an earlier row of the file")
                        continue
                    seen.add(key)
                    if row.get("status", "success") != "success":
                        error = f" ({row['error_message']})" if row.get("error_message") else ""
                        yield Rejected(where, f"status {row['status']}{error}")
                    elif not isinstance(row["txt"], str):
                        yield Rejected(where, "no caption (txt is null)")
                    else:
                        yield Sample(where, f"{name}/{key}.{image_column}", row["txt"].strip())
        except (OSError, pa.ArrowException) as e:  # damaged pages: the rows read so far stay
            yield Rejected(name, f"the file is unreadable after its first {len(seen)} rows: {e}")


def sample_metadata(image: Path, archives: ArchiveMembers) -> dict[str, Any] | None:
    """A sample's metadata, by its image's member path: its ``KEY.json`` in a tar (None without one), or its
    parquet row's other columns (the image bytes left out)."""
    member = split_member_path(image)
    if member is None:
        return None
    archive, name = member
    key, _ = sample_key(name)
    if archive.suffix.lower() == ".tar":
        try:
            return json.loads(archives.read(image.with_name(f"{Path(key).name}.json")).data)
        except InputError:  # no KEY.json
            return None
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(archive) as parquet:
        columns = [c for c in parquet.schema_arrow.names if c not in PARQUET_IMAGE_COLUMNS]
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            found = batch.filter(pc.equal(pc.cast(batch.column("key"), pa.string()), key))
            if found.num_rows:
                return {column: values[0] for column, values in found.to_pydict().items()}
    return None
