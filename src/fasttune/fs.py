"""Writes that fail cleanly: filesystem errors name their path, directories appear whole or not at all.

A full disk, a read-only mount or a file where a directory should be is the user's to fix, so the CLI
prints it as one line (`filesystem_error` turns what safetensors or a library raised into an OSError
naming the path). A directory is written under a temporary name and renamed into place (`replace_dir`),
so a crash or a failed write never leaves half of one where the old one was.
"""

from __future__ import annotations

import errno as errno_codes
import os
import re
import shutil
from pathlib import Path

# errors that mean "this path cannot be written as asked", not "fasttune has a bug"
FILESYSTEM_ERRNOS = {errno_codes.ENOSPC, errno_codes.EROFS, errno_codes.ENOTDIR, errno_codes.EISDIR,
                     errno_codes.EACCES, errno_codes.EPERM, errno_codes.EDQUOT, errno_codes.EEXIST,
                     errno_codes.EFBIG, errno_codes.ENOENT, errno_codes.ENAMETOOLONG, errno_codes.EIO}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) report an OSError


def filesystem_error(e: BaseException, path: str | Path) -> BaseException:
    """`e` as an OSError naming `path` (or the file it already names) if it is a filesystem error, else e."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror, e.filename or str(path))
    found = _OS_ERROR_IN_TEXT.search(str(e))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    return e


def is_filesystem_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in FILESYSTEM_ERRNOS and e.filename is not None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync `data`; an OSError (no space, read-only, ...) always names `path`."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def temporary_sibling(final: Path) -> Path:
    """Where `final` is written before `replace_dir` renames it into place (one per process)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the fully written directory `tmp` at `final`, replacing what was there, by renames."""
    fsync_path(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)
