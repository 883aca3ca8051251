"""Files and digests: the one atomic write and the one sha256 helper of the project."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

_BLOCK = 1 << 20


def sha256_hex(data: bytes) -> str:
    """The lowercase hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The lowercase hex sha256 of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in directory `path` durable (POSIX; a no-op where it cannot be opened)."""
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


def syncfs(path: str | os.PathLike) -> bool:
    """Flush every write of the file system holding `path` to disk in one call (Linux syncfs(2)); False where
    that is not available, and the caller must fsync file by file."""
    libc = _libc()
    if libc is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return libc.syncfs(fd) == 0
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "syncfs") else None
    except OSError:
        return None


def atomic_write(path: str | os.PathLike, data: bytes | Sequence[bytes], mode: int = 0o644,
                 sync: bool = True) -> None:
    """Write `data` (bytes, or pieces written one after the other) to `path` so that a crash leaves either
    the old file or the whole new one: a temporary file in the same directory, fsync, rename over `path`,
    fsync of the directory. With `sync` False neither fsync happens: the caller makes many such writes
    durable at once (`syncfs`). Creates parent folders."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(target.parent)
