"""Bad input through the stages' own entry points: a generated corpus of bad files and params,
each giving exit code 1 and one line on stderr that names the file, column, line or count."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT

from stages import ingest, split, validate
from stages.core.common import layout
from stages.core.common.cli import run_stage

GOOD_CSV = "height,weight,diagnosis,site\n" + "".join(
    f"{h},{w},{d},{s}\n"
    for h, w, d, s in zip(
        range(40), range(40, 80), [0, 1] * 20, ["A"] * 20 + ["B"] * 20, strict=True
    )
)
OWN = {"label": "diagnosis", "domain_column": "site", "base_domain": "A", "target_domain": "B"}


def write_params(data: dict, validate_section: dict | None = None, **sections) -> None:
    params = {"data": data, "validate": {"feature_range": None} | (validate_section or {})}
    Path("params.yaml").write_text(yaml.safe_dump(params | sections))


def source(name: str, content: bytes | str) -> str:
    path = Path("data/source") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def fails(stage: str, main: Callable[[], None], capsys, argv: list[str] | None = None) -> str:
    """Run a stage as its module does; return its one stderr line (exit code 1)."""
    with pytest.raises(SystemExit) as caught:
        run_stage(stage, main, argv or [])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{stage}: error: ")
    assert "Traceback" not in err
    return err.removeprefix(f"{stage}: error: ").rstrip("\n")


@pytest.fixture(autouse=True)
def mlflow_store_exists(mlflow_client) -> None:
    """MLflow logs to stderr while it creates a store: create the session's store first."""


def _silent_port() -> tuple[socket.socket, int]:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    return silent, silent.getsockname()[1]


# name -> (write the bad input and params, fragments the line must hold)
CORPUS: dict[str, tuple[Callable[[], None], list[str]]] = {
    "missing file": (
        lambda: write_params({"source": "data/source/absent.csv"} | OWN),
        ["data.source: file not found: data/source/absent.csv", "fix data.source"],
    ),
    "unreadable parquet": (
        lambda: write_params({"source": source("own.parquet", b"PAR1 garbage")} | OWN),
        ["data/source/own.parquet: not a readable Parquet file"],
    ),
    "ragged csv line": (
        lambda: write_params(
            {"source": source("own.csv", GOOD_CSV.replace("3,43,1,A", "3,43,1,A,extra"))} | OWN
        ),
        ["data/source/own.csv: line 5 has 5 fields, the header has 4", "fix that line"],
    ),
    "header only": (
        lambda: write_params({"source": source("own.csv", "height,weight,diagnosis,site\n")} | OWN),
        ["data/source/own.csv: the file has no rows"],
    ),
    "zero bytes": (
        lambda: write_params({"source": source("own.csv", b"")} | OWN),
        ["data/source/own.csv: the file is empty"],
    ),
    "not utf-8": (
        lambda: write_params(
            {"source": source("own.csv", GOOD_CSV.replace("site", "sit\xe9").encode("latin-1"))}
            | OWN
        ),
        ["data/source/own.csv: not UTF-8 text (byte 0xe9 on line 1)", "save the file as UTF-8"],
    ),
    "wrong checksum": (
        lambda: write_params({"source": source("own.csv", GOOD_CSV), "sha256": "0" * 64} | OWN),
        ["data/source/own.csv: sha256 mismatch", hashlib.sha256(GOOD_CSV.encode()).hexdigest()],
    ),
    "unknown scheme": (
        lambda: write_params({"source": "ftp://example.org/own.csv"} | OWN),
        ["unknown scheme 'ftp:'"],
    ),
    "url without checksum": (
        lambda: write_params({"source": "https://example.org/own.csv"} | OWN),
        ["params.yaml: data.sha256: ", "required for an http(s) source"],
    ),
    "label column missing": (
        lambda: write_params({"source": source("own.csv", GOOD_CSV)} | OWN | {"label": "outcome"}),
        ["data.label: column 'outcome' not in data/source/own.csv"],
    ),
    "text in a listed feature": (
        lambda: write_params(
            {"source": source("own.csv", GOOD_CSV.replace("\n7,", "\nseven,", 1))}
            | OWN
            | {"features": ["height", "weight"]}
        ),
        ["data/source/own.csv: column 'height' (data.features) is not numeric", "on line 9"],
    ),
    # Real files that would load: DVC does not track them, so editing one never reruns ingest.
    "absolute source path": (
        lambda: write_params({"source": str(Path(source("own.csv", GOOD_CSV)).resolve())} | OWN),
        ["data.source: must be a path inside the repository", "DVC only tracks files inside"],
    ),
    "source path climbing out of the repo": (
        lambda: write_params(
            {"source": f"../{Path.cwd().name}/{source('own.csv', GOOD_CSV)}"} | OWN
        ),
        ["data.source: climbs out of the repository", "DVC only tracks files inside the repo"],
    ),
    "image folder without image_shape": (
        lambda: (
            source("scans/cat/a.png", b"\x89PNG"),
            write_params({"source": "data/source/scans", "image_shape": None}),
        ),
        ["data.image_shape: required to read the image folder data/source/scans"],
    ),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_to_ingest_is_one_line(case: str, capsys) -> None:
    prepare, fragments = CORPUS[case]
    prepare()
    line = fails("ingest", ingest.main, capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert not layout.RAW.exists()


def test_silent_host_through_ingest(capsys) -> None:
    silent, port = _silent_port()
    with silent:
        url = f"http://127.0.0.1:{port}/own.csv"
        write_params({"source": url, "sha256": "0" * 64, "download_timeout": 0.2} | OWN)
        line = fails("ingest", ingest.main, capsys)
    assert line == (
        f"{url}: no answer from 127.0.0.1:{port} within 0.2 s (3 tries); "
        "check the URL and the network, or raise data.download_timeout"
    )


def test_verbose_shows_the_traceback_first(capsys) -> None:
    write_params({"source": "data/source/absent.csv"} | OWN)
    with pytest.raises(SystemExit):
        run_stage("ingest", ingest.main, ["--verbose"])
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith(
        "ingest: error: data.source: file not found: data/source/absent.csv; "
        "put the file there or fix data.source\n"
    )


def test_module_passes_its_command_line(tmp_path: Path) -> None:
    write_params({"source": "data/source/absent.csv"} | OWN)
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    for argv, traceback in (([], False), (["--verbose"], True)):
        done = subprocess.run(
            [sys.executable, "-m", "stages.ingest", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1
        assert ("Traceback" in done.stderr) is traceback
        assert done.stderr.splitlines()[-1].startswith("ingest: error: data.source: file not found")


def _ingest_and_validate(csv: str, capsys, **validate_section) -> None:
    write_params({"source": source("own.csv", csv)} | OWN, validate_section)
    run_stage("ingest", ingest.main)
    run_stage("validate", validate.main)
    capsys.readouterr()


def test_class_too_small_to_split_is_one_line(capsys) -> None:
    # Class 2 has 2 rows in site A: validate lets it through (min_rows_per_class: 1) ...
    rows = GOOD_CSV + "100,200,2,A\n101,201,2,A\n102,202,2,B\n103,203,2,B\n"
    _ingest_and_validate(rows, capsys, min_rows_per_class=1)
    # ... and split cannot put one of each class in train, val and test.
    line = fails("split", split.main, capsys)
    assert line.startswith("split: cannot stratify the A domain (22 rows; smallest class 2 has 2")
    assert "raise validate.min_rows_per_class to stop earlier" in line


def test_validate_gate_failure_writes_every_output_then_exits_1(capsys) -> None:
    rows = GOOD_CSV.replace("5,45,1,A", "5,,1,A").replace("6,46,0,A", "6,46,,A")
    write_params({"source": source("own.csv", rows)} | OWN, {"max_quarantine_fraction": 0.01})
    run_stage("ingest", ingest.main)
    capsys.readouterr()
    line = fails("validate", validate.main, capsys)
    assert line == (
        "validate.max_quarantine_fraction: 2 of 40 rows (5.0%) quarantined, more than 1.0%; "
        "see data/quarantine/rejected.parquet"
    )
    rejected = pd.read_parquet(layout.REJECTED)
    assert rejected["reason"].tolist() == ["weight is missing", "label is missing"]
    assert rejected["raw_row"].tolist() == [5, 6]
    clean = pd.read_parquet(layout.CLEAN)
    assert len(clean) == 38
    assert "weight is missing" in layout.VALIDATION_HTML.read_text()


def test_validate_with_a_broken_suite_file(capsys) -> None:
    _ingest_and_validate(GOOD_CSV, capsys)
    Path("data/suites").mkdir(parents=True)
    Path("data/suites/raw.json").write_text("{not json")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["validate"]["suite"] = "data/suites/raw.json"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    line = fails("validate", validate.main, capsys)
    assert line.startswith("validate.suite: data/suites/raw.json: not valid JSON (")


def test_a_suite_path_that_leaves_data_suites_is_refused(capsys) -> None:
    _ingest_and_validate(GOOD_CSV, capsys)
    validate.main(["--infer-suite", "elsewhere.json"])  # a real suite, outside data/suites/
    capsys.readouterr()
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["validate"]["suite"] = "data/suites/../../elsewhere.json"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    line = fails("validate", validate.main, capsys)
    assert line.startswith("params.yaml: validate.suite: must be a .json file under data/suites/")
    assert "(it resolves to elsewhere.json)" in line
    assert "(got 'data/suites/../../elsewhere.json')" in line


def test_a_hand_edited_suite_without_the_label_check_still_quarantines_missing_labels(
    capsys,
) -> None:
    rows = GOOD_CSV.replace("6,46,0,A", "6,46,,A")
    _ingest_and_validate(rows, capsys, min_rows_per_class=1)
    validate.main(["--infer-suite", "data/suites/raw.json"])
    suite = json.loads(Path("data/suites/raw.json").read_text())
    suite["expectations"] = [
        item
        for item in suite["expectations"]
        if item["kwargs"].get("column") != "label" or "null" not in item["type"]
    ]
    Path("data/suites/raw.json").write_text(json.dumps(suite))
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["validate"]["suite"] = "data/suites/raw.json"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    run_stage("validate", validate.main)
    capsys.readouterr()
    rejected = pd.read_parquet(layout.REJECTED)
    assert rejected["reason"].tolist() == ["label is missing"]
    assert rejected["raw_row"].tolist() == [6]
    report = json.loads(layout.VALIDATION_REPORT.read_text())
    assert report["rows_in"] == 40 == report["rows_clean"] + report["rows_quarantined"]
    assert pd.read_parquet(layout.CLEAN)["label"].notna().all()


def test_validate_before_ingest(capsys) -> None:
    write_params({"source": "sklearn:digits"})
    line = fails("validate", validate.main, capsys)
    assert line == "data/raw/dataset.parquet: not found; run `dvc repro ingest` first"


def test_infer_then_validate_against_the_committed_suite(capsys) -> None:
    _ingest_and_validate(GOOD_CSV, capsys)
    validate.main(["--infer-suite", "data/suites/own.json"])
    out = capsys.readouterr().out
    assert "wrote 10 expectations inferred from data/raw/dataset.parquet (40 rows)" in out
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["validate"]["suite"] = "data/suites/own.json"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    # New data: a height above anything seen when inferring, and a new class.
    source("own.csv", GOOD_CSV + "99,50,0,A\n20,50,7,B\n")
    run_stage("ingest", ingest.main)
    run_stage("validate", validate.main)
    rejected = pd.read_parquet(layout.REJECTED)
    assert rejected["reason"].tolist() == [
        "height = 99 outside [0, 39]",
        "label 7 not in [0, 1]",
    ]
    report = yaml.safe_load(layout.VALIDATION_REPORT.read_text())
    assert report["rows_in"] == 42 == report["rows_clean"] + report["rows_quarantined"]
    assert "data/suites/own.json" in layout.VALIDATION_HTML.read_text()
    assert np.isin(rejected["raw_row"], [40, 41]).all()


def test_validate_and_split_log_their_reports_to_mlflow(capsys, mlflow_client) -> None:
    import uuid

    # An experiment of this test's own: the session's store holds other tests' runs too.
    experiment_name = f"bad-input-{uuid.uuid4().hex}"
    write_params(
        {"source": source("own.csv", GOOD_CSV)} | OWN, tracking={"experiment": experiment_name}
    )
    for stage, main in (
        ("ingest", ingest.main),
        ("validate", validate.main),
        ("split", split.main),
    ):
        run_stage(stage, main)
    capsys.readouterr()
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    runs = mlflow_client.search_runs([experiment.experiment_id], "tags.stage != ''")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {stage: len(found) for stage, found in by_stage.items()} == {
        "ingest": 1,
        "validate": 1,
        "split": 1,
    }
    (validate_run,), (split_run,) = by_stage["validate"], by_stage["split"]
    names = {a.path for a in mlflow_client.list_artifacts(validate_run.info.run_id)}
    assert {"validation.json", "validation.html"} <= names
    assert validate_run.data.metrics["rows_in"] == 40
    assert validate_run.data.metrics["checks.duplicate"] == 0
    names = {a.path for a in mlflow_client.list_artifacts(split_run.info.run_id)}
    assert {"drift.json", "drift.csv"} <= names
    # Site A holds heights 0-19 (weights 40-59), site B 20-39 (60-79): over 10 equal bins of
    # each feature's range, A fills bins 0-4 with 1/5 each and B bins 5-9, every other bin has
    # the floor share 1e-4; so each feature's PSI is 10 * (0.2 - 1e-4) * ln(0.2 / 1e-4).
    expected_psi = 10 * (0.2 - 1e-4) * np.log(0.2 / 1e-4)
    logged = split_run.data.metrics
    assert logged["drift.domain_gap.psi_mean"] == pytest.approx(expected_psi, abs=1e-5)
    assert logged["drift.domain_gap.psi_max"] == pytest.approx(expected_psi, abs=1e-5)
    assert logged["drift.domain_gap.shifted_features"] == 2
