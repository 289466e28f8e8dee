"""Atomic, deterministic file writes: a crash never leaves a half-written output."""

from __future__ import annotations

import json
import os
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
