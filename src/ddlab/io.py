"""Writing files so that a reader never sees half of one.

:func:`atomic_write` opens a temporary file next to ``path`` (same folder, so the rename stays on
one file system), yields it, fsyncs it and renames it over ``path`` (``os.replace`` is atomic on
POSIX and Windows). If anything fails or the process is interrupted by an exception, the temporary
file is removed and ``path`` keeps its previous content. A disk that is full or read-only raises an
``OSError`` naming the folder, the bytes that were needed and the space that is free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


def temp_path(path: PathLike) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path`` (hidden, per process)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


def free_bytes(folder: PathLike) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def disk_error(e: OSError, path: PathLike, needed: int | None = None) -> OSError:
    """``e`` re-worded for a person: which folder, how much space was needed and is free, what to do."""
    folder = Path(path).parent.resolve()
    if e.errno == errno.ENOSPC:
        need = f"about {needed / 2**20:.1f} MiB" if needed else "more space"
        free = free_bytes(folder)
        have = f"{free / 2**20:.1f} MiB free" if free >= 0 else "free space unknown"
        msg = f"disk full writing {Path(path).name} in {folder}: it needs {need} ({have}); free space there or point the run elsewhere"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg = f"cannot write {Path(path).name} in {folder}: the folder is read-only or not writable ({e.strerror}); make it writable or point the run elsewhere"
    else:
        msg = f"cannot write {Path(path).name} in {folder}: {e}"
    out = OSError(e.errno, msg)
    out.filename = str(path)
    return out


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", needed: int | None = None) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)`` — see the module docstring. ``mode``: ``wb`` or ``w``;
    ``needed``: the expected size in bytes, quoted when the disk is full."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
            raise disk_error(e, path, needed) from e
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)
