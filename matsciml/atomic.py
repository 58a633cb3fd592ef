"""Put a finished file or folder in place of an old one, with no moment where neither exists.

A single file is replaced with :func:`os.replace` (atomic on POSIX and Windows). A folder cannot be
renamed over another one, so on Linux the two are swapped in one ``renameat2(RENAME_EXCHANGE)``
system call (called through ctypes: Python has no wrapper) and the old one, now at the temporary
path, is deleted after. Where that call does not exist (macOS, Windows, Linux < 3.15, filesystems
without exchange support such as some network mounts), the fallback moves the old folder aside
and the new one in: two renames, between which a reader can find neither (the documented window);
if the second rename fails the old folder is moved back.

:func:`write_file` writes one file that way (a temporary file beside it, then one rename), and a
write that fails because the disk is full is a :class:`DiskFullError` naming the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_FULL = (errno.ENOSPC, errno.EDQUOT)
# LMDB reports a short write into a full filesystem as EIO: with this little space left (or 1/64 of a
# small filesystem), it was the disk
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """No space (or quota) left on the filesystem a file or dataset was being written to."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}; free some space and run again")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # a DataLoader worker or DDP rank sends it back whole
        return (type(self), (self.filename,))


def disk_full(err: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``path`` if ``err`` (raised writing it) means the disk is full.

    Call it before the partial output is removed: LMDB's EIO is judged by the space left then.
    """
    chain, seen = [], set()
    while err is not None and id(err) not in seen:  # torch.save raises RuntimeError from the OSError
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    found = next((link for link in chain if isinstance(link, DiskFullError)), None)
    if found is not None:
        return found
    codes = {getattr(link, "errno", None) for link in chain}
    if codes & set(_FULL):
        return DiskFullError(path)
    if errno.EIO in codes or any(type(link).__module__.partition(".")[0] == "lmdb" for link in chain):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        usage = shutil.disk_usage(folder)
        if usage.free < min(_NEARLY_FULL_BYTES, usage.total // 64):
            return DiskFullError(path)
    return None


def write_file(path: str | os.PathLike, content: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (bytes, or a function writing to a binary handle) to a temporary file
    beside ``path``, then rename it into place.

    The old file stays byte-identical until the new one is complete and on disk; on any error
    the temporary file is removed, and a full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(content) if isinstance(content, bytes) else content(handle)
            handle.flush()
            os.fsync(handle.fileno())  # where a full disk shows on filesystems that allocate late
        replace_path(temporary, path)
    except BaseException as err:
        full = disk_full(err, path)
        temporary.unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically; ``False`` where the system cannot (nothing changed then)."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # no exchange here: fall back
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def replace_path(new: str | os.PathLike, old: str | os.PathLike) -> None:
    """Move ``new`` (a finished file or folder) to ``old``'s path, replacing what is there.

    ``new`` must be on the same filesystem (write it beside ``old``). A reader sees the old
    version or the new one, never neither (except in the fallback described in the module doc).
    """
    new, old = Path(new), Path(old)
    if not old.exists() and not old.is_symlink():
        os.replace(new, old)
        return
    if not new.is_dir() and not old.is_dir():
        os.replace(new, old)  # files: atomic on every platform
        return
    if exchange(new, old):  # ``new`` now holds the old version
        _remove(new)
        return
    aside = old.with_name(f".{old.name}.{os.getpid()}.old")
    os.replace(old, aside)
    try:
        os.replace(new, old)
    except BaseException:
        os.replace(aside, old)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
