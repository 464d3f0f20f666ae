"""Input files identified by their content: what a run records of each image it attributed, and how a resume,
``render`` or the viewer tell that the file changed since (size and modification time first, a hash only when
they differ, so that checking a million unchanged images costs a million ``stat`` calls; ``data.verify: always``
hashes every file, for edits that keep both)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


def file_identity(path: Path) -> FileIdentity:
    """The identity of the file at ``path`` now (raises ``OSError`` as ``open`` does)."""
    status = os.stat(path)
    return FileIdentity(status.st_size, status.st_mtime_ns, sha256_of([path]))


def has_changed(path: Path, recorded: FileIdentity, *, verify: Verify = "changed") -> bool:
    """Whether the file at ``path`` holds other content than ``recorded`` (a missing file has changed). A file
    touched without a change of content (same bytes, new time) has not. With ``verify="changed"`` a file whose
    size and modification time equal the record's is trusted unread: one edited in place that kept both (``cp -p``,
    ``rsync -t``, ``exiftool -P``) is not found; ``"always"`` hashes it."""
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
