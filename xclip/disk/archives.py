"""Images inside tar and parquet files (WebDataset shards and img2dataset's parquet output), named by member paths.

A *member path* is a path one of whose ancestors is a regular ``.tar`` or ``.parquet`` file: the rest of the path
names the member. In a tar that is the member's name (``part-00000.tar/000000001.jpg``); in a parquet file it is
the sample's key and the column holding its bytes (``part-00000.parquet/000000001.jpg``: key ``000000001``, column
``jpg``). A run stores its images' member paths as it stores file paths, relative to the data root.

:class:`ArchiveMembers` reads members. It is an object that callers keep (one per DataLoader dataset, one per
viewer): each archive's index (member name -> where its bytes lie) is built at its first use and kept, and it
holds no open files when pickled, so each DataLoader worker opens the archives itself.
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xclip.errors import InputError

ARCHIVE_SUFFIXES = (".tar", ".parquet")
# the image files and members xclip reads (any format Pillow opens that photographs come in)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# img2dataset's parquet columns that may hold a sample's image bytes, in the order they are looked for
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image")
# rows decoded at a time from a parquet column: a member is read without the rest of its row group in memory
_PARQUET_ROWS = 64
_BLOCK = tarfile.BLOCKSIZE


def split_member_path(path: Path) -> tuple[Path, str] | None:
    """``(archive, member name)`` when an ancestor of ``path`` is a regular ``.tar`` or ``.parquet`` file, else
    None. Only ancestors with those suffixes are looked at on disk: a plain image path costs no system call."""
    for parent in path.parents:
        if parent.suffix.lower() in ARCHIVE_SUFFIXES and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


def sample_key(member: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name, as WebDataset groups members: the key is the name up to the first
    dot after its last ``/`` (``dir/000000001.jpg`` -> ``dir/000000001``, ``jpg``)."""
    folder, _, base = member.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


@dataclass(frozen=True)
class MemberBytes:
    """A member's bytes as read: decoded as an image, hashed as the image's content (its archive's modification
    time stands for the member's)."""

    path: Path  # the member path
    data: bytes
    archive_mtime_ns: int


def is_present(image: Path | MemberBytes) -> bool:
    """Whether an image is there to read: member bytes, a regular file, or a member path whose archive is one (the
    member itself is looked up when it is read)."""
    if isinstance(image, MemberBytes):
        return True
    return image.is_file() or split_member_path(image) is not None


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of its data in the archive
    size: int


@dataclass(frozen=True)
class TarListing:
    """A tar's regular-file members in archive order, and what ended the listing early, if anything."""

    members: list[TarMember]
    cut: TarMember | None = None  # the member whose data the end of the file cuts (a truncated archive)
    damage: str | None = None  # why the listing ended before the archive's end-of-archive blocks


def list_tar(archive: Path) -> TarListing:
    """The members of an uncompressed tar, read header by header (the data is skipped, never read).

    Python's :mod:`tarfile` ends a listing quietly where a file is cut or a header damaged; here that is found and
    said: a member whose data runs past the end of the file is ``cut``, and a listing that does not end at tar's
    zero blocks has its ``damage`` described. Every member before the damage is listed.

    Raises:
        InputError: the file is not a tar archive at all (or is compressed).
        OSError: it cannot be read.
    """
    size = archive.stat().st_size
    members: list[TarMember] = []
    try:
        with tarfile.open(archive, "r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member = TarMember(info.name, info.offset_data, info.size)
                if member.offset + member.size > size:
                    return TarListing(members, cut=member)
                members.append(member)
            end = tar.offset  # where tarfile stopped: zero blocks in an intact archive
    except tarfile.ReadError as e:
        if members:  # a header after the first one that tarfile refuses outright
            return TarListing(members, damage=f"unreadable tar header after {members[-1].name} ({e})")
        msg = f"{archive} is not an uncompressed tar archive ({e})"
        raise InputError(msg) from None
    with archive.open("rb") as stream:
        stream.seek(end)
        tail = stream.read(_BLOCK)
    if len(tail) == _BLOCK and not tail.strip(b"\0"):
        return TarListing(members)
    after = f" after {members[-1].name}" if members else ""
    what = "ends" if len(tail) < _BLOCK else "holds no tar header"
    return TarListing(members, damage=f"the file {what} at byte {end}{after}, where tar's end-of-archive blocks belong (cut or damaged)")


class ArchiveMembers:
    """Reads members of tar and parquet files by member path (see the module's doc).

    Keeps the indices and open files of the last ``max_open`` archives it read; safe to share between threads (the
    viewer's). A pickled copy (a DataLoader worker's) starts empty.
    """

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: OrderedDict[Path, _Archive] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_open"])  # type: ignore[misc]

    def __enter__(self) -> ArchiveMembers:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for archive in self._open.values():
                archive.close()
            self._open.clear()

    def image(self, path: Path) -> Path | MemberBytes:
        """A member path's bytes, read; any other path as it is (the image reader opens it)."""
        member = split_member_path(path)
        return path if member is None else self._read(path, *member)

    def read(self, path: Path) -> MemberBytes:
        """The bytes of the member at ``path``.

        Raises:
            InputError: ``path`` is no member path, or its archive holds no such member.
            OSError: the archive cannot be read.
        """
        member = split_member_path(path)
        if member is None:
            msg = f"{path} is not a member of a tar or parquet file"
            raise InputError(msg)
        return self._read(path, *member)

    def _read(self, path: Path, archive: Path, name: str) -> MemberBytes:
        with self._lock:
            opened = self._open.pop(archive, None)
            mtime_ns = os.stat(archive).st_mtime_ns
            if opened is not None and opened.mtime_ns != mtime_ns:  # rewritten since it was indexed
                opened.close()
                opened = None
            if opened is None:
                opened = _TarArchive(archive, mtime_ns) if archive.suffix.lower() == ".tar" else _ParquetArchive(archive, mtime_ns)
            self._open[archive] = opened  # the most recently used last
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
            return MemberBytes(path, opened.read(name), mtime_ns)


class _Archive:
    def __init__(self, path: Path, mtime_ns: int) -> None:
        self.path, self.mtime_ns = path, mtime_ns

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def missing(self, name: str) -> InputError:
        return InputError(f"{self.path} holds no member {name!r}")


class _TarArchive(_Archive):
    """A tar's index (member name -> offset and size), built once; members read at their offsets."""

    def __init__(self, path: Path, mtime_ns: int) -> None:
        super().__init__(path, mtime_ns)
        listing = list_tar(path)
        self.members = {member.name: member for member in listing.members}
        self.cut = listing.cut
        self.stream = path.open("rb")

    def read(self, name: str) -> bytes:
        member = self.members.get(name)
        if member is None:
            if self.cut is not None and self.cut.name == name:
                msg = f"{self.path} is cut inside member {name!r}: the file ends before its {self.cut.size} bytes"
                raise InputError(msg)
            raise self.missing(name)
        self.stream.seek(member.offset)
        data = self.stream.read(member.size)
        if len(data) != member.size:  # the file shrank since it was indexed
            msg = f"{self.path} ends inside member {name!r}: read {len(data)} of its {member.size} bytes"
            raise InputError(msg)
        return data

    def close(self) -> None:
        self.stream.close()


class _ParquetArchive(_Archive):
    """A parquet file's index (key -> row group and row), built once from its ``key`` column; a member's bytes
    read from a cursor that walks its column a few rows at a time, so that reading the rows of a file in order
    decodes each page once and holds a few rows, never a row group."""

    def __init__(self, path: Path, mtime_ns: int) -> None:
        import pyarrow.parquet as pq

        super().__init__(path, mtime_ns)
        self.file = pq.ParquetFile(path)
        names = self.file.schema_arrow.names
        if "key" not in names:
            msg = f"{path} has no 'key' column: its rows cannot be named"
            raise InputError(msg)
        self.columns = set(names)
        self.rows: dict[str, tuple[int, int]] = {}
        for group in range(self.file.num_row_groups):
            keys = self.file.read_row_group(group, columns=["key"]).column(0).to_pylist()
            for row, key in enumerate(keys):
                self.rows.setdefault(str(key), (group, row))
        # per column: (row group, first row of the current batch, the batch, the rest of the row group's batches)
        self.cursors: dict[str, tuple[int, int, Any, Any]] = {}

    def read(self, name: str) -> bytes:
        key, column = sample_key(name)
        if key not in self.rows or column not in self.columns:
            raise self.missing(name)
        group, row = self.rows[key]
        cursor = self.cursors.get(column)
        if cursor is None or cursor[0] != group or row < cursor[1]:  # another row group, or behind: start it again
            batches = self.file.iter_batches(batch_size=_PARQUET_ROWS, row_groups=[group], columns=[column])
            cursor = (group, 0, next(batches).column(0), batches)
        _, start, batch, batches = cursor
        while row >= start + len(batch):
            start += len(batch)
            batch = next(batches).column(0)
        self.cursors[column] = (group, start, batch, batches)
        value = batch[row - start].as_py()
        if value is None:
            msg = f"{self.path}: sample {key} has no bytes in column {column!r}"
            raise InputError(msg)
        if isinstance(value, str):
            return value.encode()
        if not isinstance(value, bytes):
            msg = f"{self.path}: column {column!r} holds {type(value).__name__}, not bytes"
            raise InputError(msg)
        return value

    def close(self) -> None:
        self.cursors.clear()
        self.file.close()
