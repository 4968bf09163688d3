"""Writes that either complete or leave what was there: a writer lock, an atomic folder swap, a
staged copy of a whole folder, and an atomic single file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def _link(source: str, target: str) -> None:
    """Hard-link ``source`` at ``target`` (a copy where the file system refuses links)."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _claim(staging: Path, target: Path, who: str) -> int:
    """Make the folder ``staging`` holding a locked ``LOCK_FILE``; returns the lock's descriptor.

    The lock is taken before the folder appears under its name, so a ``staging`` whose lock
    can be taken belongs to a writer that crashed, and is cleared."""
    for _ in range(3):
        fresh = Path(tempfile.mkdtemp(prefix=f"{staging.name}.", dir=staging.parent))
        fd = os.open(fresh / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.rename(fresh, staging)
            return fd
        except OSError as err:
            os.close(fd)
            remove(fresh)
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        try:
            other = os.open(staging / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:  # a folder without a lock: not a writer's; gone or unfinished
            remove(staging)
            continue
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{who}: another process is saving to {str(target)!r}; one writer per folder "
                               "at a time.") from None
        finally:
            os.close(other)
        remove(staging)  # a crashed writer's
    raise RuntimeError(f"{who}: could not claim {str(staging)!r} to stage the write of {str(target)!r}.")


@contextlib.contextmanager
def staged_folder(target: Path, who: str, *, primary: bool = True,
                  agree: Callable[[bool], bool] | None = None) -> Iterator[Path]:
    """A copy of the folder ``target`` to write into, put in its place in one atomic swap when
    the block ends; if the block raises, the copy is dropped and ``target`` is as it was.

    The copy hard-links ``target``'s files (empty if ``target`` does not exist), so writers
    must replace files, never change them in place (lorax's writers all do). It lives beside
    ``target`` in ``.{name}.lorax-staging``, whose lock refuses a second writer; folders above
    ``target`` created for it are removed again after a failure. On a multi-process run every
    process enters, ``primary`` (process 0) alone moves files, and ``agree(ok)`` (process 0's
    ``ok``, on every process, a barrier) orders the processes.

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "bank"
    >>> with staged_folder(folder, "demo") as staged:
    ...     _ = (staged / "a.txt").write_text("new")
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt']
    """
    staging = target.parent / f".{target.name}.lorax-staging"
    staged, made, fd = staging / "folder", [], None
    try:
        try:
            if primary:
                made = _make_parents(target.parent)
                fd = _claim(staging, target, who)
                _copy_or_create(target, staged)
        except BaseException:
            if agree is not None:
                agree(False)
            raise
        if agree is not None and not agree(True):
            raise RuntimeError(f"{who}: process 0 could not stage the write of {str(target)!r}.")
        with _named_for(staged, target):
            yield staged
        if primary:
            swap_in(staged, target)
        if agree is not None:
            agree(True)
    finally:
        if fd is not None:
            remove(staging)  # the old target after a swap, or the unused copy
            os.close(fd)
        if not target.exists():
            _remove_empty(made)


@contextlib.contextmanager
def _named_for(staged: Path, target: Path) -> Iterator[None]:
    """Errors raised inside name ``target`` where they name its staged copy ``staged``."""
    try:
        yield
    except (ValueError, TypeError, RuntimeError, FileExistsError) as err:
        if type(err) not in (ValueError, TypeError, RuntimeError, FileExistsError) or str(staged) not in str(err):
            raise
        raise type(err)(str(err).replace(str(staged), str(target))).with_traceback(err.__traceback__) from None


def _copy_or_create(target: Path, staged: Path) -> None:
    """``staged`` as a copy of the folder ``target``, its files hard-linked; empty if ``target`` is missing."""
    if target.is_dir():
        shutil.copytree(target, staged, symlinks=True, copy_function=_link)
    else:
        staged.mkdir()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, who: str, *, overwrite: bool = False) -> Iterator[str]:
    """A temporary file path to write in full, which becomes ``path`` when the block ends: the
    file is synced to disk, then renamed into place, so ``path`` ends complete or as it was.

    An existing file is refused (FileExistsError) unless ``overwrite``; a replaced file keeps
    its permissions, a new one gets those ``open(path, "w")`` would give under the umask.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.bin")
    >>> with atomic_file(path, "demo") as temp:
    ...     _ = open(temp, "wb").write(b"data")
    >>> open(path, "rb").read()
    b'data'
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"{who}: overwrite must be True or False, got {overwrite!r}.")
    target = Path(path).absolute()
    if target.is_dir():
        raise ValueError(f"{who}: {str(target)!r} is a folder; pass a file's path.")
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"{who}: {str(target)!r} already exists; pass overwrite=True to replace it.")
    made = _make_parents(target.parent)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield temp
        os.chmod(temp, _file_mode(target))
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        _place(temp, target, overwrite, who)
        _sync_folder(target.parent)
    finally:
        if os.path.lexists(temp):
            os.remove(temp)
        if not target.exists():
            _remove_empty(made)


def _file_mode(target: Path) -> int:
    """The permissions for ``target``: its own if it exists, else ``0o666`` less the umask."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _place(temp: str, target: Path, overwrite: bool, who: str) -> None:
    """Rename ``temp`` to ``target``; without ``overwrite``, never over a file that appeared meanwhile."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)  # fails if target exists: no check-then-rename race
    except FileExistsError:
        raise FileExistsError(f"{who}: {str(target)!r} already exists; pass overwrite=True to replace it.") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise FileExistsError(f"{who}: {str(target)!r} already exists; pass overwrite=True to replace "
                                  "it.") from None
        os.rename(temp, target)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder
    finally:
        os.close(fd)
