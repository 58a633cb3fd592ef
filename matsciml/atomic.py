"""Put a finished file or folder in place of an old one, with no moment where neither exists.

A single file is replaced with :func:`os.replace` (atomic on POSIX and Windows). A folder cannot be
renamed over another one, so on Linux the two are swapped in one ``renameat2(RENAME_EXCHANGE)``
system call (called through ctypes: Python has no wrapper) and the old one, now at the temporary
path, is deleted after. Where that call does not exist (macOS, Windows, Linux < 3.15, filesystems
without exchange support such as some network mounts), the fallback moves the old folder aside
and the new one in: two renames, between which a reader can find neither (the documented window);
if the second rename fails the old folder is moved back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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
