"""Atomic file writes: a temporary file in the destination's folder, fsync, ``os.replace``, then an fsync of the
folder (which holds the rename: without it, a power loss could bring back the old file or none).

A reader (or a resumed run) sees either the old file or the complete new one, never a partial write.
The new file gets the mode a plain ``open(path, "w")`` would give it: ``0o666 & ~umask`` for a new file
(the temporary file is created with it, so the umask is never read), the existing file's mode when it
replaces one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


_TMP_EXTRA = 14  # what a temporary name adds to its stem: "." + "." + 8 hex digits + ".tmp"


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _temp_stem(folder: Path, name: str) -> str:
    """The part of ``name`` a temporary name beside it carries: ``name`` itself, or, for a name within
    ``_TMP_EXTRA`` bytes of the folder's limit (NAME_MAX, 255 on most file systems; such a name could be
    written, but never through a temporary file), its start and a hash of the whole."""
    limit = _name_max(folder) - _TMP_EXTRA
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    import hashlib

    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    keep = raw[: max(1, limit - len(tag))]
    return os.fsdecode(keep.decode("utf-8", "ignore").encode("utf-8") if keep else b"x") + tag


def _create_temporary(p: Path) -> tuple[Path, int]:
    """A new empty file ``.<name>.<random>.tmp`` beside ``p`` and its descriptor, open for writing, created
    with mode 0o666 less the umask (as ``open(p, "w")`` would create ``p``: the kernel applies the umask, so
    it is never read or changed). ``<name>``: see :func:`_temp_stem`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    stem = _temp_stem(p.parent, p.name)
    for _ in range(100):
        tmp = p.parent / f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {p}")  # pragma: no cover - 100 collisions of 2^32


def _sync_folder(folder: Path) -> None:
    """fsync ``folder``, so that a rename into it survives a power loss: the rename changes the folder's
    entries, which the fsync of the file itself does not write to disk. Where a folder cannot be opened or
    synced (Windows refuses both; some file systems refuse the fsync with EINVAL) nothing is done: the rename is
    then as durable as the system makes it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, p: Path, *, durable: bool = False) -> None:
    """Move the finished ``tmp`` over ``p``, giving it the mode of the file it replaces; ``durable``: then
    fsync the folder, which holds the rename (:func:`_sync_folder`)."""
    try:
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except FileNotFoundError:
        mode = None
    if mode is not None and mode != stat.S_IMODE(os.stat(tmp).st_mode):
        os.chmod(tmp, mode)
    os.replace(tmp, p)
    if durable:
        _sync_folder(p.parent)


def file_in_the_way(path: str | os.PathLike, *, itself: bool = False) -> Path | None:
    """The first of ``path``'s parent folders (and ``path`` itself, with ``itself``) that exists but is a file,
    so that nothing can be written at ``path``; None when there is none."""
    p = Path(path)
    return next((q for q in ((p,) if itself else ()) + tuple(p.parents) if q.exists() and not q.is_dir()), None)


def check_writable(path: str | os.PathLike) -> None:
    """PermissionError when ``path`` is an existing file this process may not write, as ``open(path, "r+")``
    would refuse it. For writers that reopen their finished file for writing (a dense matrix returned
    memory-mapped read-write): called before the work, since the atomic replace itself needs only the folder's
    permission, keeps the file's read-only mode, and the reopening failed after an all_pairs of hours."""
    p = Path(path)
    if p.is_file() and not os.access(p, os.W_OK):
        raise PermissionError(errno.EACCES, "Permission denied (an existing read-only file; not replaced)", str(p))


def check_writable_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or the OSError that writing a file there would meet, raised now (before the work
    whose result it is to hold): it is a folder, or one of its parents is a file."""
    p = Path(path)
    if p.is_dir():  # (the temporary file was written, then os.replace said "Is a directory")
        raise IsADirectoryError(errno.EISDIR, "is an existing folder; give a file name", str(p))
    blocker = file_in_the_way(p)
    if blocker is not None:  # mkdir said "[Errno 17] File exists: 'afile'" for afile/x.csv
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write it: {blocker} is an existing file, not a folder",
                                 str(p))
    return p


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, *, durable: bool = False) -> Iterator[tuple[Path, int]]:
    """A new temporary file beside ``path`` and its open descriptor (the block closes it); when the block
    completes, the file replaces ``path`` (``durable``: and the folder is synced, see :func:`_replace`); when
    it raises, the file is removed (and an OSError that names no file, as a write to a full disk raises, or the
    temporary file, is raised again naming ``path``)."""
    p = check_writable_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp, fd = _create_temporary(p)
    except OSError as exc:  # (the folder is not writable, ...: name the file asked for, not a temporary name)
        raise type(exc)(exc.errno, exc.strerror, str(p)) from exc
    try:
        yield tmp, fd
        _replace(tmp, p, durable=durable)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp)):
            # a failed write or fsync says only "[Errno 28] No space left on device": name the file (the one
            # asked for, not its temporary name)
            raise type(exc)(exc.errno, exc.strerror, str(p)) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file's path beside ``path`` for the block to write; when the block completes, the file
    replaces ``path`` atomically (with the mode of a plain ``open``: a new file's ``0o666 & ~umask``, an
    existing file's own); when it raises, the file is removed and ``path`` is left as it was."""
    with _replacing(path) as (tmp, fd):
        os.close(fd)
        yield tmp


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """glibc's ``fallocate(fd, mode, offset, len)`` (Linux), or None where there is none."""
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate() if sys.platform.startswith("linux") else None


def _fallocate(fd: int, size: int) -> None:
    """Allocate the blocks of bytes [0, size) of open file ``fd`` through the ``fallocate`` system call, which,
    unlike ``posix_fallocate``, never falls back to writing a byte into every block (glibc's emulation, slow on
    a large file over NFS and the like); raises OSError (errno set) when the call fails."""
    import ctypes

    if _FALLOCATE is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _FALLOCATE(fd, 0, 0, size) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def reserve(path: str | os.PathLike) -> None:
    """Allocate the disk blocks of the file at ``path`` up to its size.

    ``np.lib.format.open_memmap`` / ``np.memmap`` create their file sparse, so a disk (or tmpfs) without room
    for it fails only when a write into the mapped pages finds no free block: the kernel sends SIGBUS and the
    process dies with "Bus error" and no message, leaving its temporary file behind. Called on a new memmap's
    file, a full disk is instead an OSError here ("No space left on device", naming the file). Where the
    filesystem (or the OS: Linux only) has no ``fallocate``, the file is left as it is.
    """
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size:
            _fallocate(fd, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, durable: bool = True) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it over ``path`` atomically.

    The file is synced before the move and its folder after it (``durable``), so that after a power loss
    ``path`` is the whole new file. ``durable=False`` skips both fsyncs (~0.3 ms a file here, far more on
    network filesystems): running processes still see the old file or the whole new one, but after a power
    loss the new name may hold an empty or short file, or the old one. Only for caches whose reader checks each
    file and recomputes a damaged one."""
    with _replacing(path, durable=durable) as (_, fd), open(fd, "wb") as f:  # (the descriptor that made it)
        write(f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``durable``: see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def remove_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None, *,
                       older_than: float | None = None) -> list[Path]:
    """Delete the temporary files that writes into ``folder`` left behind when their process was killed
    (names ``.<file>.<random>.tmp``, as :func:`atomic_path` makes them): those of the files in ``names``, or
    every such file when ``names`` is None (a folder the job owns). For a job's own outputs, at its start (one
    job per folder at a time). In a folder that several jobs may write at once (a shared cache), pass
    ``older_than`` (seconds): only temporaries last modified that long ago are removed, never one that a
    running write still holds. Returns what was removed."""
    d = Path(folder)
    gone = []
    if d.is_dir():
        patterns = [".*.tmp"] if names is None else [f".{glob.escape(_temp_stem(d, n))}.*.tmp" for n in names]
        cutoff = None if older_than is None else time.time() - older_than
        for pattern in patterns:
            for f in d.glob(pattern):
                try:
                    if not f.is_file() or f.is_symlink() or (cutoff is not None and f.stat().st_mtime > cutoff):
                        continue
                except OSError:  # (gone meanwhile: another job's write just finished)
                    continue
                f.unlink(missing_ok=True)
                gone.append(f)
    return gone
