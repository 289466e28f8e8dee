"""Atomic, deterministic writes: no half-written outputs, equal data gives equal bytes."""

from __future__ import annotations

import stat
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from stages.core.common.io import (
    read_json,
    write_atomic,
    write_csv,
    write_json,
    write_parquet,
    write_text,
)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_atomic_creates_parents_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    returned = write_atomic(target, lambda tmp: tmp.write_text("hello"))
    assert returned == target
    assert target.read_text() == "hello"
    assert _files(target.parent) == ["out.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_write_atomic_writes_beside_the_target(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")

    write_atomic(tmp_path / "out.json", write)
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".out.json.") and seen[0].name.endswith(".tmp")
    assert not seen[0].exists()


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path, error) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def write(tmp: Path) -> None:
        tmp.write_text("half a fi")
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, write)
    assert target.read_text() == "old\n"
    assert _files(tmp_path) == ["metrics.json"]


def test_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        raise ValueError("cannot serialise")

    with pytest.raises(ValueError):
        write_atomic(tmp_path / "new.txt", write)
    assert _files(tmp_path) == []


def test_write_text_replaces(tmp_path: Path) -> None:
    write_text(tmp_path / "r.md", "first\n")
    write_text(tmp_path / "r.md", "second\n")
    assert (tmp_path / "r.md").read_text() == "second\n"
    assert _files(tmp_path) == ["r.md"]


def test_write_json_is_sorted_indented_and_newline_terminated(tmp_path: Path) -> None:
    path = write_json(tmp_path / "m.json", {"b": 1, "a": {"d": [1, 2], "c": None}})
    assert path.read_text() == (
        '{\n  "a": {\n    "c": null,\n    "d": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n'
    )
    assert read_json(path) == {"a": {"c": None, "d": [1, 2]}, "b": 1}


def test_write_json_is_byte_stable(tmp_path: Path) -> None:
    one = {"accuracy": 0.912345, "classes": [0, 1], "nested": {"z": 1, "y": 2}}
    two = {"nested": {"y": 2, "z": 1}, "classes": [0, 1], "accuracy": 0.912345}
    first = write_json(tmp_path / "one.json", one).read_bytes()
    assert write_json(tmp_path / "two.json", two).read_bytes() == first
    assert write_json(tmp_path / "one.json", one).read_bytes() == first


def test_write_parquet_round_trip_without_index(tmp_path: Path, raw_frame) -> None:
    frame = raw_frame.iloc[::2]  # a non-default index must not be stored
    path = write_parquet(tmp_path / "data" / "raw.parquet", frame)
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, frame.reset_index(drop=True))
    assert pq.read_schema(path).names == list(frame.columns)
    assert _files(path.parent) == ["raw.parquet"]


def test_write_parquet_is_byte_stable(tmp_path: Path, raw_frame) -> None:
    first = write_parquet(tmp_path / "a.parquet", raw_frame).read_bytes()
    assert write_parquet(tmp_path / "b.parquet", raw_frame.copy()).read_bytes() == first


def test_write_csv(tmp_path: Path) -> None:
    frame = pd.DataFrame({"epoch": [1, 2], "loss": [0.123456789, 2.0], "name": ["a", "b"]})
    path = write_csv(tmp_path / "plots" / "train.csv", frame.set_index("name", drop=False))
    assert path.read_text() == "epoch,loss,name\n1,0.123457,a\n2,2,b\n"
    assert write_csv(tmp_path / "again.csv", frame).read_bytes() == path.read_bytes()
