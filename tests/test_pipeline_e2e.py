"""End to end: the real `dvc repro` on a temporary git repo holding a copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "stages",
    "data/source",
    "data/suites",
    ".dvcignore",
    ".dvc/config",
]
STAGES = ["ingest", "validate", "split", "train", "finetune", "evaluate"]
# Small but real: fewer epochs, and gates loose enough for them.
SMALL_PARAMS = {
    "train": {"epochs": 8, "patience": None},
    "finetune": {"epochs": 30},
    "evaluate": {"min_base_accuracy": 0.5, "min_transfer_gain": -1.0, "draws": 2},
}

pytestmark = pytest.mark.e2e


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def lock_md5s(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


@pytest.fixture(scope="module")
def env() -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # `python` in dvc.yaml must be this interpreter (the project's venv).
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment |= {"MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}
    return environment


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    """A fresh git repo with the project's code and small params, after one cold `dvc repro`."""
    repo = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SMALL_PARAMS.items():
        params[section] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n__pycache__/\n")
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    git_id = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", *git_id, "commit", "-qm", "project"], repo, env)
    first = run(["dvc", "repro"], repo, env)
    assert ran_stages(first.stdout) == STAGES
    run(["git", "add", "-A"], repo, env)
    run(["git", *git_id, "commit", "-qm", "outputs"], repo, env)
    return repo


def test_cold_repro_writes_every_output(repo):
    for path in [
        "data/raw/dataset.parquet",
        "data/clean/dataset.parquet",
        "data/quarantine/rejected.parquet",
        "models/base/model.safetensors",
        "models/base/config.json",
        "models/finetuned/model.safetensors",
        "plots/train.csv",
        "plots/finetune.csv",
        "plots/confusion.csv",
        "reports/evaluation.md",
    ]:
        assert (repo / path).is_file(), path
    splits = sorted(p.name for p in (repo / "data/splits").iterdir())
    assert splits == sorted(
        f"{r}_{p}.parquet" for r in ("base", "target") for p in ("train", "val", "test")
    )
    validation = json.loads((repo / "reports/validation.json").read_text())
    assert validation["rows_in"] == 1797 and validation["rows_quarantined"] == 0
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for key in ("base", "zero_shot", "finetuned", "scratch", "sklearn"):
        assert 0 <= metrics[key]["accuracy"] <= 1
    assert metrics["base"]["accuracy"] > 0.8  # 8 epochs already learn the base domain
    assert metrics["zero_shot"]["accuracy"] < 0.5  # the inverted domain is a real shift
    assert metrics["transfer"]["draws"] == 2


def test_second_repro_runs_nothing(repo, env):
    again = run(["dvc", "repro"], repo, env)
    assert ran_stages(again.stdout) == []
    status = run(["dvc", "status"], repo, env)
    assert "up to date" in status.stdout


def test_mlflow_store_at_repo_root_holds_each_stage(repo):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {run.data.tags["stage"]: run for run in runs}
    assert sorted(by_stage) == sorted(STAGES)
    assert by_stage["train"].data.params["train.epochs"] == "8"
    history = client.get_metric_history(by_stage["train"].info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert by_stage["evaluate"].data.metrics["finetuned.accuracy"] > 0


def test_dvc_views_work(repo, env):
    dag = run(["dvc", "dag"], repo, env).stdout
    assert all(stage in dag for stage in STAGES)
    assert "finetuned.accuracy" in run(["dvc", "metrics", "show"], repo, env).stdout
    plots = run(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo, env)
    assert (repo / "plots_html" / "index.html").is_file(), plots.stdout


def test_exp_run_reruns_only_what_the_param_touches(repo, env):
    tuned = run(["dvc", "exp", "run", "-S", "finetune.lr=0.005"], repo, env)
    assert ran_stages(tuned.stdout) == ["finetune", "evaluate"]
    resplit = run(["dvc", "exp", "run", "-S", "split.seed=1"], repo, env)
    assert ran_stages(resplit.stdout) == ["split", "train", "finetune", "evaluate"]
    shown = run(["dvc", "exp", "show", "--csv"], repo, env).stdout
    assert "finetune.lr" in shown and "0.005" in shown
    run(["git", "checkout", "--", "."], repo, env)
    run(["dvc", "checkout", "-q"], repo, env)


def test_forced_repro_is_byte_identical(repo, env):
    before = lock_md5s(repo)
    metrics_before = (repo / "metrics/evaluate.json").read_text()
    run(["dvc", "repro", "-f"], repo, env)
    assert lock_md5s(repo) == before
    assert (repo / "metrics/evaluate.json").read_text() == metrics_before
