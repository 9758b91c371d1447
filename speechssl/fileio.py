"""Atomic file writes, the one way every room writes a file a later stage trusts (floor 0: imports nothing of ours).

A reader sees either the old file or the complete new one, never a half-written one: data goes to a temp file in
the same directory, is fsynced, then renamed over the target; the directory entry is fsynced after the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["fsync_dir", "atomic_open", "atomic_path", "atomic_dir", "atomic_write_bytes", "atomic_write_text"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, on error removed.

    For writers that want a file name (matplotlib ``savefig``, libraries that open the file themselves).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, mode)  # mkstemp creates 0600; outputs are ordinary shared data
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, mode: int = 0o755, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path`` (``.NAME.tmp-*``); on success it becomes ``path`` by one rename, on
    error it is removed. The one way a directory is replaced atomically (checkpoints, data dirs, corpus trees).

    ``path`` must not exist, unless ``replace``: then the old directory is moved aside (``.NAME.old-*``) just
    before the rename and deleted after it, so a reader sees the old directory or the new one (a crash between
    the two renames leaves the old one beside, under its ``.old-`` name). The files written into the temp
    directory should be fsynced by their writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        os.chmod(tmp, mode)  # mkdtemp creates 0700
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_open(p) as f: f.write(...)``: a binary file that appears at ``p`` only when complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
