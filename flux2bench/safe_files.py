"""The one way flux2bench writes a file: a new inode in the file's own folder, renamed over its name.

Whatever sits at a name the tool writes is never written through: a symbolic link there is replaced by the new file
(never followed), and a hard link there is unlinked from that name by the rename, so the other names of its inode
(a file outside the run directory, say) keep their content. A name that is neither a regular file nor a link (a
folder, a FIFO, a device, a socket) is refused, as is a lock file that is a link or has other names. The temporary
is created exclusively without following a link, fsynced, and renamed into place, so a file is whole or not there;
a write that fails (a full disk) removes its temporary and leaves the old file as it was.

Files that grow while a process runs (worker logs, memory timelines) get the same treatment when they are created
(``open_fresh``): a new inode renamed over the name at once, then written through the descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeTarget(OSError):
    """A name the tool will not write: not a regular file, or a lock that is linked elsewhere."""

    def __init__(self, path: Path, problem: str):
        super().__init__(errno.EINVAL, problem, str(path))


def check_target(path: Path) -> None:
    """Refuse ``path`` when something other than a regular file or a link is there (a link is replaced)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise UnsafeTarget(path, "is not a regular file (a FIFO, device or socket); flux2bench writes only regular "
                                 "files")


def open_new(path: Path) -> int:
    """A descriptor for writing ``path``, which must not exist yet; never follows a link."""
    return os.open(path, _NEW_FILE, 0o644)


def _temporary(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a killed writer, or a link planted there: removed, never followed
    return tmp


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file object whose content replaces ``path`` when the block ends without an exception (a new inode renamed
    over the name); on an exception nothing at ``path`` changes and no temporary is left."""
    path = Path(path)
    check_target(path)
    tmp = _temporary(path)
    try:
        with os.fdopen(open_new(tmp), mode, encoding=None if "b" in mode else encoding or "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        check_target(path)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def make_folders(folder: Path) -> None:
    """Make ``folder`` and the folders above it that are missing; a file where one of them belongs is a
    NotADirectoryError naming that file (not mkdir's "File exists")."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((f for f in (folder, *folder.parents) if f.exists() and not f.is_dir()), None)
        if blocking is None:
            raise
        raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a folder", str(blocking)) from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all (see ``replacing``)."""
    with replacing(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def open_fresh(path: Path) -> int:
    """A descriptor of a new, empty file now at ``path`` (a new inode renamed over the name), for a file written
    while a process runs: what was at ``path`` is replaced, never written through."""
    path = Path(path)
    check_target(path)
    tmp = _temporary(path)
    fd = open_new(tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created if missing, never truncated here), refused when it is a link,
    not a regular file, or has other names (a hard link: writing the holder's PID into it would write elsewhere)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeTarget(path, "is a link; a lock file is a plain file of its own") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode)
               else f"has {info.st_nlink} names (a hard link); a lock file is a plain file of its own"
               if info.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise UnsafeTarget(path, problem)
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (never through a link; a FIFO is not waited on), at most ``limit``
    of them: ValueError beyond, or when it is not a regular file (a folder, a FIFO, a device), naming it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # checked before the descriptor becomes a file object, which refuses a folder
        os.close(fd)
        raise ValueError(f"{path} is a folder, not a regular file" if stat.S_ISDIR(mode)
                         else f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes")
    return data
