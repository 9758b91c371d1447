"""Atomic file writes, the one way every room writes a file a later stage trusts (floor 0: imports nothing of ours).

A reader sees either the old file or the complete new one, never a half-written one: data goes to a temp file in
the same directory, is fsynced, then renamed over the target; the directory entry is fsynced after the rename.

Output preflight: every verb that writes calls :func:`check_writable_dir` / :func:`check_writable_file` on its
outputs before any work, so a file in the way or a read-only directory is one line naming the path and the option
at once, not a traceback after an hour of computing. :func:`os_error_line` is the command line's safety net for an
``OSError`` about a path that slipped past them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["fsync_dir", "atomic_open", "atomic_path", "atomic_dir", "atomic_write_bytes", "atomic_write_text",
           "check_writable_dir", "check_writable_file", "os_error_line"]


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


# ------------------------------------------------------------------------------------------ output preflight


def _user_error(msg: str) -> Exception:
    from speechssl.errors import UserError  # floor 0 as well; imported here to keep this module's imports minimal

    return UserError(msg)


def _check_dir(p: Path, shown: Path, what: str, create: bool) -> None:
    """``p`` is (or can become) a writable directory; messages name ``shown`` and the option ``what``."""
    if p.exists() and not p.is_dir():
        raise _user_error(f"{what} {shown}: {p} is a file, not a directory; remove it or give another {what}")
    anc = p
    while not anc.exists():  # the nearest existing ancestor decides whether p can be created
        if os.path.lexists(anc):
            raise _user_error(f"{what} {shown}: {anc} is a broken symbolic link; remove it or give another {what}")
        anc = anc.parent
    if not anc.is_dir():
        raise _user_error(f"{what} {shown}: {anc} is a file, not a directory; remove it or give another {what}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise _user_error(f"{what} {shown}: directory {anc} is not writable; make it writable or give another {what}")
    if create and not p.exists():
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _user_error(f"{what} {shown}: cannot create directory {e.filename or p}: {e.strerror or e}; give "
                              f"another {what}") from e


def check_writable_dir(path: str | os.PathLike, what: str, *, create: bool = False) -> Path:
    """Preflight of an output directory, before any work: ``path`` is a directory this process can write in.

    By default nothing is created: ``path`` must be a directory or absent, and the nearest existing directory above
    it writable (so a verb that then fails on its inputs leaves no empty output behind, and outputs that appear by
    one rename, :func:`atomic_dir`, or must not exist yet keep that property). ``create``: make it now, with its
    parents. Raises :class:`~speechssl.errors.UserError` naming ``what`` (the option, e.g. ``--out``) and the path: a file in the
    way (of ``path`` or a parent), a directory that is not writable. Returns ``path`` as a Path."""
    p = Path(path)
    _check_dir(p, p, what, create)
    return p


def check_writable_file(path: str | os.PathLike, what: str, *, create: bool = False) -> Path:
    """Preflight of an output file (written with :func:`atomic_path` & co.): not a directory, and its directory is
    writable or can be created (``create``: now). Errors as :func:`check_writable_dir`."""
    p = Path(path)
    if p.is_dir():
        raise _user_error(f"{what} {p}: a directory is in the way of this output file; remove it or give another "
                          f"{what}")
    _check_dir(p.parent, p, what, create)
    return p


# errno values of an OSError that are about the user's file system, never a bug: one line, no traceback
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOSPC, errno.EROFS,
                errno.ENOTEMPTY, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error_line(e: BaseException) -> str | None:
    """``PATH: strerror`` for an ``OSError`` about the file system that names its path (permission, a file or
    directory in the way, a read-only file system, a full disk), else None (a bug: it deserves its traceback).
    A full disk is named even without a path (``write()`` reports none)."""
    if not isinstance(e, OSError) or e.errno not in _PATH_ERRNOS:
        return None
    what = e.strerror or os.strerror(e.errno)
    if e.filename is None:
        return f"{what} (errno {errno.errorcode.get(e.errno, e.errno)}); free some space" if e.errno in _FULL else None
    where = f"{e.filename} -> {e.filename2}" if getattr(e, "filename2", None) else f"{e.filename}"
    return f"{where}: {what}"
