"""Folder writes that either complete or leave what was there: a writer lock and an atomic swap."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lorax.lock"
_RENAME_EXCHANGE = 2  # linux/fs.h


def as_folder(directory, who: str, *, must_exist: bool) -> Path:
    """``directory`` as an absolute `Path`, refusing a regular file (and, if ``must_exist``, a missing path).

    >>> import tempfile
    >>> as_folder(tempfile.mkdtemp(), "demo", must_exist=True).is_dir()
    True
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{who}: directory must be a str or os.PathLike, got {type(directory).__name__}.")
    path = Path(directory).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{who}: {str(path)!r} is a file, not a folder.")
    if must_exist and not path.is_dir():
        raise ValueError(f"{who}: {str(path)!r} does not exist.")
    return path


@contextlib.contextmanager
def writer_lock(folder: Path, who: str) -> Iterator[None]:
    """Hold ``folder/.lorax.lock`` for the duration; a second writer gets a clear error, not a wait."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{who}: another process is saving to {str(folder)!r}; "
                               "one writer per folder at a time.") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def swap_in(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``; an old ``target`` ends at ``new`` (delete it after).

    A missing ``target`` is a plain rename. An existing one is exchanged atomically with
    Linux's ``renameat2(RENAME_EXCHANGE)``; where that is unavailable, two renames are
    used and a crash between them leaves the old folder at ``new``.
    """
    if not target.exists():
        os.rename(new, target)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    if exchange is not None:
        at_cwd = -100
        if exchange(at_cwd, os.fsencode(new), at_cwd, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(target))
    aside = new.with_name(new.name + ".old")
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
