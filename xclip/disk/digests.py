"""Input files identified by their content: what a run records of each image it attributed, and how a resume,
``render`` or the viewer tell that the file changed since (size and modification time first, a hash only when
they differ, so that checking a million unchanged images costs a million ``stat`` calls; ``data.verify: always``
hashes every file, for edits that keep both). An image inside a tar or parquet file (a member path, see
:mod:`xclip.disk.archives`) is identified by its member's bytes and its archive's modification time."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xclip.disk.archives import ArchiveMembers, MemberBytes, split_member_path
from xclip.errors import XclipError

# what tells a resume, render or the viewer that an image file changed (the config's data.verify): "changed"
# hashes a file only when its size or modification time differ from the record, "always" hashes every file
Verify = Literal["changed", "always"]
_CHUNK = 1 << 24  # files are hashed in chunks: a large one need not fit in memory


@dataclass(frozen=True)
class FileIdentity:
    """A file as it was read: its size and modification time (cheap to compare) and its content's SHA-256."""

    size: int
    mtime_ns: int
    sha256: str


def sha256_of(paths: Iterable[Path]) -> str:
    """SHA-256 of the files' contents, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def file_identity(image: Path | MemberBytes, archives: ArchiveMembers | None = None) -> FileIdentity:
    """The identity of the image file at ``image`` now (raises ``OSError`` as ``open`` does). A member of a tar or
    parquet file (its path, or its bytes as read) has its member's size and SHA-256 and its archive's modification
    time; ``archives`` reads a member path (a new reader when None)."""
    if isinstance(image, Path) and split_member_path(image) is not None:
        with _reader(archives) as reader:
            image = reader.read(image)
    if isinstance(image, MemberBytes):
        return FileIdentity(len(image.data), image.archive_mtime_ns, hashlib.sha256(image.data).hexdigest())
    status = os.stat(image)
    return FileIdentity(status.st_size, status.st_mtime_ns, sha256_of([image]))


def has_changed(path: Path, recorded: FileIdentity, *, verify: Verify = "changed", archives: ArchiveMembers | None = None) -> bool:
    """Whether the file at ``path`` holds other content than ``recorded`` (a missing file has changed). A file
    touched without a change of content (same bytes, new time) has not. With ``verify="changed"`` a file whose
    size and modification time equal the record's is trusted unread: one edited in place that kept both (``cp -p``,
    ``rsync -t``, ``exiftool -P``) is not found; ``"always"`` hashes it.

    A member of a tar or parquet file is trusted unread while its archive keeps the recorded modification time;
    otherwise its bytes are read (through ``archives``, which keeps each archive's index: pass one when checking
    many members) and compared.
    """
    member = split_member_path(path)
    if member is not None:
        return _member_has_changed(path, member[0], recorded, verify, archives)
    try:
        status = os.stat(path)
    except OSError:
        return True
    if verify == "changed" and (status.st_size, status.st_mtime_ns) == (recorded.size, recorded.mtime_ns):
        return False
    try:
        return status.st_size != recorded.size or sha256_of([path]) != recorded.sha256
    except OSError:
        return True


def _member_has_changed(path: Path, archive: Path, recorded: FileIdentity, verify: Verify, archives: ArchiveMembers | None) -> bool:
    try:
        if verify == "changed" and os.stat(archive).st_mtime_ns == recorded.mtime_ns:
            return False
        with _reader(archives) as reader:
            data = reader.read(path).data
    except (OSError, XclipError):  # the archive or the member is gone or unreadable
        return True
    return len(data) != recorded.size or hashlib.sha256(data).hexdigest() != recorded.sha256


@contextmanager
def _reader(archives: ArchiveMembers | None) -> Iterator[ArchiveMembers]:
    """``archives``, or a reader of one's own for this one read, closed after it."""
    if archives is not None:
        yield archives
        return
    with ArchiveMembers(max_open=1) as own:
        yield own
