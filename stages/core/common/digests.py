"""File digests as DVC computes them (md5 of a file, or of a directory listing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def _file_digest(path: Path | str, digest) -> str:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: Path | str) -> str:
    """The md5 DVC records for a file (of its bytes)."""
    return _file_digest(path, hashlib.md5())


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes (``data.sha256`` of a download, a checkpoint's weights)."""
    return _file_digest(path, hashlib.sha256())


def dvc_md5(path: Path | str) -> str:
    """The md5 DVC records in dvc.lock: of the bytes for a file; for a folder, of the sorted
    list of its files' md5s and relative paths, suffixed ``.dir``."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    entries = sorted(
        (
            {"md5": file_md5(file), "relpath": file.relative_to(path).as_posix()}
            for file in path.rglob("*")
            if file.is_file()
        ),
        key=lambda entry: entry["relpath"],
    )
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"
