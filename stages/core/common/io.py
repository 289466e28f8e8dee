"""Atomic, deterministic file writes: a crash never leaves a half-written output (a file, or a
directory written as a whole)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def write_atomic(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path | str, data: Any) -> Path:
    """Write JSON with sorted keys and a trailing newline, so equal data gives equal bytes."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_parquet(path: Path | str, frame: pd.DataFrame) -> Path:
    return write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_csv(path: Path | str, frame: pd.DataFrame) -> Path:
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def write_dir_atomic(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Write the directory ``path`` as a whole: ``write(tmp)`` fills a new directory beside it,
    whose files and itself are fsynced, then it takes the place of ``path`` (which may exist,
    with any content) and the old one is removed.

    A crash at any point leaves the old or the new directory complete: on Linux the two swap in
    one ``renameat2(RENAME_EXCHANGE)``; elsewhere the old one is renamed aside first, so a crash
    between the two renames leaves ``path`` missing and the old one complete beside it. What a
    crashed write leaves (``.<name>.*.tmp`` and ``.<name>.*.old`` beside ``path``) is removed by
    the next write. One writer per ``path`` at a time; a process working in ``path`` (its
    cwd) stays in the old, removed directory.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*parent.glob(f".{path.name}.*.tmp"), *parent.glob(f".{path.name}.*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)
    new = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        write(new)
        os.chmod(new, 0o755)  # mkdtemp's 0700 would differ from every other output folder
        for file in sorted(new.rglob("*")):
            if file.is_file():
                os.chmod(file, 0o644)  # as write_atomic's files (safetensors writes 0600)
                _fsync(file)
        _fsync(new)
        old = _swap_in(new, path)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync(parent)  # the renames themselves
    if old is not None:
        shutil.rmtree(old)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(new: Path, path: Path) -> Path | None:
    """Put ``new`` at ``path``; return where the old directory went (None: there was none)."""
    if not path.exists() and not path.is_symlink():
        os.rename(new, path)
        return None
    if path.is_dir() and not path.is_symlink() and _exchange(new, path):
        return new  # now holds the old directory
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rename(path, aside / path.name)
    os.rename(new, path)
    return aside


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system or the
    filesystem cannot, so that the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
