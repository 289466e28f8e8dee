"""Lineage: DVC's md5 of files and folders, what dvc.yaml and dvc.lock record, the git state,
and how a stage finds the dvc process of its execution."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import GIT_ID

from stages.core.common.digests import dvc_md5
from stages.core.tracking.lineage import (
    _is_dvc,
    execution_key,
    git_state,
    locked_data_inputs,
    locked_outputs,
    stage_outputs,
)


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dvc_md5_is_what_dvc_records(tmp_path: Path, pipeline_env: dict) -> None:
    """The md5 of a file and of a nested folder, against `dvc add` in a real DVC repo."""
    _run(["git", "init", "-q"], tmp_path)
    _run(["dvc", "init", "-q"], tmp_path, pipeline_env)
    folder = tmp_path / "models"
    (folder / "deep").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 50)
    (folder / "deep" / "z.txt").write_text("last\n")
    single = tmp_path / "table.csv"
    single.write_text("a,b\n1,2\n")
    _run(["dvc", "add", "-q", "models", "table.csv"], tmp_path, pipeline_env)
    recorded = {
        name: yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        for name in ("models", "table.csv")
    }
    assert recorded["models"].endswith(".dir")
    assert dvc_md5(folder) == recorded["models"]
    assert dvc_md5(single) == recorded["table.csv"]


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["dvc", "repro"], True),
        (["/venv/bin/python", "/venv/bin/dvc", "exp", "exec-run"], True),
        (["python3.11", "-m", "dvc", "repro"], True),
        (["python", "-m", "stages.train"], False),
        (["/bin/bash", "-c", "dvc repro"], False),
        (["python", "dvc_helper.py"], False),
        ([], False),
    ],
)
def test_is_dvc(cmdline: list[str], expected: bool) -> None:
    assert _is_dvc(cmdline) is expected


def test_no_execution_key_outside_dvc() -> None:
    assert execution_key() is None


def test_execution_key_is_the_dvc_ancestor(tmp_path: Path, pipeline_env: dict) -> None:
    """Two stages under one `dvc repro` share a key; a second `dvc repro` gets another."""
    _run(["git", "init", "-q"], tmp_path)
    _run(["dvc", "init", "-q"], tmp_path, pipeline_env)
    record = "from stages.core.tracking.lineage import execution_key; print(execution_key())"
    stages = {
        name: {"cmd": f'python -c "{record}" > {name}.key', "outs": [f"{name}.key"]}
        for name in ("a", "b")
    }
    stages["b"]["deps"] = ["a.key"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    from conftest import REPO_ROOT

    env = pipeline_env | {"PYTHONPATH": str(REPO_ROOT)}
    keys = []
    for _ in range(2):
        _run(["dvc", "repro", "-f", "-q"], tmp_path, env)
        keys.append([(tmp_path / f"{n}.key").read_text().strip() for n in ("a", "b")])
    first, second = keys
    assert first[0] == first[1] and second[0] == second[1]
    assert first[0] != second[0]
    assert first[0].count(":") == 2 and first[0] != "None"


DVC_YAML = {
    "stages": {
        "prep": {
            "cmd": "python -m stages.prep",
            "deps": ["stages/prep.py", "data/source"],
            "outs": ["data/raw.parquet"],
            "metrics": [{"reports/prep.json": {"cache": False}}],
        },
        "fit": {
            "cmd": "python -m stages.fit",
            "deps": ["stages/fit.py", "data/raw.parquet"],
            "outs": ["models/m"],
            "plots": [{"plots/fit.csv": {"cache": False}}],
        },
    }
}
DVC_LOCK = {
    "schema": "2.0",
    "stages": {
        "prep": {
            "deps": [
                {"path": "stages/prep.py", "md5": "c0de"},
                {"path": "data/source", "md5": "5ource.dir"},
            ],
            "outs": [{"path": "data/raw.parquet", "md5": "new-raw"}],
        },
        "fit": {
            "deps": [
                {"path": "stages/fit.py", "md5": "c0de2"},
                {"path": "data/raw.parquet", "md5": "old-raw"},  # before prep reran
            ],
            "outs": [{"path": "models/m", "md5": "m0del.dir"}, {"path": "plots/fit.csv"}],
        },
    },
}


def test_what_dvc_yaml_and_dvc_lock_say(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(DVC_LOCK))
    assert stage_outputs("prep", tmp_path / "dvc.yaml") == ["data/raw.parquet", "reports/prep.json"]
    assert stage_outputs("fit", tmp_path / "dvc.yaml") == ["models/m", "plots/fit.csv"]
    assert stage_outputs("absent", tmp_path / "dvc.yaml") == []
    assert locked_outputs(tmp_path / "dvc.lock") == {
        "prep": {"data/raw.parquet": "new-raw"},
        "fit": {"models/m": "m0del.dir"},
    }
    # Data inputs only (no code), the producer's md5 winning over a stale reader's.
    assert locked_data_inputs(tmp_path / "dvc.lock", tmp_path / "dvc.yaml") == {
        "data/raw.parquet": "new-raw",
        "data/source": "5ource.dir",
    }
    assert locked_outputs(tmp_path / "missing.lock") == {}


def test_an_edited_dvc_yaml_is_read_again(tmp_path: Path) -> None:
    """dvc.yaml is parsed once per version (a run asks for every stage's outputs): an edit of
    the same length, or the file replaced by a rename as DVC writes dvc.lock, is seen."""
    path = tmp_path / "dvc.yaml"
    path.write_text("stages:\n  prep:\n    outs: [a.csv]\n")
    assert stage_outputs("prep", path) == ["a.csv"]
    path.write_text("stages:\n  prep:\n    outs: [b.csv]\n")
    assert stage_outputs("prep", path) == ["b.csv"]
    replacement = tmp_path / "dvc.yaml.tmp"
    replacement.write_text("stages:\n  prep:\n    outs: [c.csv]\n")
    os.utime(replacement, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    replacement.replace(path)
    assert stage_outputs("prep", path) == ["c.csv"]


def test_git_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert git_state() == (None, False)  # not a git repo
    _run(["git", "init", "-q"], tmp_path)
    for name in ("code.py", "dvc.lock", "metrics/train.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    _run(["git", "add", "-A"], tmp_path)
    _run(["git", *GIT_ID, "commit", "-qm", "init"], tmp_path)
    head = _run(["git", "rev-parse", "HEAD"], tmp_path).strip()
    assert git_state(["metrics/train.json"]) == (head, False)
    # The pipeline rewrites dvc.lock and its outputs: that is not a dirty checkout.
    (tmp_path / "dvc.lock").write_text("v2\n")
    (tmp_path / "metrics/train.json").write_text("v2\n")
    assert git_state(["metrics"]) == (head, False)
    assert git_state([]) == (head, True)
    (tmp_path / "code.py").write_text("v2\n")
    assert git_state(["metrics"]) == (head, True)
