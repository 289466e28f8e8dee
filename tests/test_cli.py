"""How a stage fails: a PipelineError is one line on stderr and exit code 1."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from stages.core.common.cli import run_stage
from stages.core.common.errors import DataError, GateError, ParamsError, PipelineError

STAGES = ["ingest", "validate", "split", "tokenize", "train", "finetune", "evaluate"]


def test_success_returns_normally(capsys) -> None:
    calls = []
    assert run_stage("train", lambda: calls.append(1)) is None
    assert calls == [1]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [PipelineError, ParamsError, DataError, GateError])
def test_pipeline_error_is_one_line_and_exit_1(capsys, error) -> None:
    def main() -> None:
        raise error("validate.max_quarantine_fraction: 7 of 72 rows quarantined")

    with pytest.raises(SystemExit) as caught:
        run_stage("validate", main)
    assert caught.value.code == 1
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "validate: error: validate.max_quarantine_fraction: 7 of 72 rows quarantined\n"


def test_an_error_of_several_lines_prints_each_with_the_prefix(capsys) -> None:
    def main() -> None:
        raise GateError("evaluate.min_base_accuracy: 0.5 < 0.9\nevaluate.min_class_recall: 0 < 0.5")

    with pytest.raises(SystemExit) as caught:
        run_stage("evaluate", main)
    assert caught.value.code == 1
    assert capsys.readouterr().err == (
        "evaluate: error: evaluate.min_base_accuracy: 0.5 < 0.9\n"
        "evaluate: error: evaluate.min_class_recall: 0 < 0.5\n"
    )


def test_credentials_in_an_error_line_are_redacted(capsys) -> None:
    """A source URL with a token (data.source) never reaches stderr, DVC's or CI's logs."""

    def main() -> None:
        raise DataError("data.source: https://user:s3cret@example.invalid/d.csv: HTTP 404")

    with pytest.raises(SystemExit):
        run_stage("ingest", main)
    err = capsys.readouterr().err
    assert err == "ingest: error: data.source: https://***@example.invalid/d.csv: HTTP 404\n"


def test_other_errors_are_not_hidden() -> None:
    """A bug is not a user error: it keeps its traceback."""

    def main() -> None:
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run_stage("train", main)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_reports_missing_params_in_one_line(capsys, stage: str) -> None:
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit) as caught:
        run_stage(stage, module.main)
    assert caught.value.code == 1
    assert capsys.readouterr().err == f"{stage}: error: params.yaml: file not found\n"


def test_stage_module_exits_1_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  lrr: 0.1\n")
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.ingest"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr == "ingest: error: params.yaml: unknown key 'train.lrr'\n"
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    ("exit_with", "code", "stderr"),
    [("None", 0, ""), ("3", 3, ""), ("'stopped: see the log'", 1, "stopped: see the log\n")],
)
def test_script_ends_as_the_interpreter_would(exit_with: str, code: int, stderr: str) -> None:
    """run_as_script ends the process with os._exit: sys.exit(None) is still 0, and a message
    is still printed and exits 1."""
    program = (
        "import sys\nfrom stages.core.common.cli import run_as_script\n"
        f"run_as_script('x', lambda: sys.exit({exit_with}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (code, stderr)
