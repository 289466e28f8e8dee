"""End to end: the real `dvc` on a temporary git repo holding a copy of the project.

One cold `dvc repro` on the default params (``pristine_repo``, shared by the session) is checked
against the README's claims with the real gates; every test that changes something works on its
own copy (``pipeline_repo``) and reruns only what it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    PIPELINE_STAGES,
    REPO_ROOT,
    commit_all,
    ran_stages,
    run_command,
    set_params,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def read_json(repo: Path, path: str) -> dict:
    return json.loads((repo / path).read_text())


def untracked(env: dict) -> dict:
    """``env`` with tracking off, for the tests that read nothing from MLflow (the stages then
    skip the store and its seconds; what they compute does not depend on it)."""
    return env | {"PIPELINE_TRACKING": "off"}


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


def test_cold_run_meets_the_readme_claims_with_the_real_gates(pristine_repo: Path) -> None:
    """The default run passed evaluate's gates (dvc repro exited 0); its figures are the ones
    the README states: base >= 0.93, the inverted domain defeats the base model, fine-tuning
    beats the same net from scratch on the same shots."""
    metrics = read_json(pristine_repo, "metrics/evaluate.json")
    assert metrics["base"]["accuracy"] >= 0.93
    assert metrics["zero_shot"]["accuracy"] <= 0.05
    transfer = metrics["transfer"]
    assert transfer["draws"] == 5
    assert transfer["gain_mean"] >= 0.03
    assert transfer["finetuned_mean"] >= 0.88
    assert transfer["finetuned_mean"] - transfer["scratch_mean"] == pytest.approx(
        transfer["gain_mean"], abs=1e-6
    )
    assert metrics["finetuned"]["accuracy"] > metrics["sklearn"]["accuracy"]
    assert metrics["transfer_gain"] == pytest.approx(
        metrics["finetuned"]["accuracy"] - metrics["scratch"]["accuracy"], abs=1e-6
    )
    report = (pristine_repo / "reports/evaluation.md").read_text()
    assert "Gates: all passed." in report
    finetuned_row = next(line for line in report.splitlines() if line.startswith("| finetuned |"))
    assert f"| {metrics['finetuned']['accuracy']:.3f} [" in finetuned_row


def test_cold_run_reproduces_the_committed_figures(pristine_repo: Path) -> None:
    """The metrics committed in the repo are what its code computes (to one test row)."""
    ours = read_json(pristine_repo, "metrics/evaluate.json")
    committed = read_json(REPO_ROOT, "metrics/evaluate.json")
    for model in ("base", "zero_shot", "finetuned", "scratch", "sklearn"):
        assert ours[model]["accuracy"] == pytest.approx(committed[model]["accuracy"], abs=0.006)
    for summary in ("transfer", "versus_sklearn"):
        assert ours[summary]["gain_mean"] == pytest.approx(
            committed[summary]["gain_mean"], abs=0.006
        )


def test_cold_run_stage_outputs_hold_what_they_claim(pristine_repo: Path) -> None:
    validation = read_json(pristine_repo, "reports/validation.json")
    assert validation["rows_in"] == 1797 == validation["rows_clean"]
    assert validation["rows_quarantined"] == 0 and validation["passed"] is True

    splits = {p.stem: pd.read_parquet(p) for p in sorted((pristine_repo / "data/splits").iterdir())}
    assert sorted(splits) == sorted(
        f"{r}_{p}" for r in ("base", "target") for p in ("train", "val", "test")
    )
    assert sum(len(frame) for frame in splits.values()) == 1797
    assert set(splits["target_test"]["domain"]) == {"target"}
    # The target domain is the inverted digits: dark background, so high mean pixel values.
    assert splits["target_test"].filter(like="pixel").to_numpy().mean() > 10
    assert splits["base_test"].filter(like="pixel").to_numpy().mean() < 6

    train = read_json(pristine_repo, "metrics/train.json")
    assert train["epochs_run"] <= 50 and 1 <= train["best_epoch"] <= train["epochs_run"]
    assert train["val_accuracy"] >= 0.93
    curve = pd.read_csv(pristine_repo / "plots/train.csv")
    assert len(curve) == train["epochs_run"]
    assert curve["val_loss"].min() == pytest.approx(train["val_loss"], abs=1e-6)

    finetune = read_json(pristine_repo, "metrics/finetune.json")
    assert finetune["shots"] == 50  # 5 per class, 10 classes
    assert finetune["trainable_parameters"] == 64 * 10 + 10  # head strategy: the new head only
    assert finetune["epochs_run"] == 200 and not finetune["stopped_early"]

    config = read_json(pristine_repo, "models/finetuned/config.json")
    assert config["arch"] == "mlp" and config["hidden"] == [128, 64]
    assert config["classes"] == list(range(10))
    assert config["feature_names"] == [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    assert config["trained_on"] == {"domain": "target", "rows": 50}
    base_config = read_json(pristine_repo, "models/base/config.json")
    assert config["mean"] == base_config["mean"] and config["std"] == base_config["std"]
    assert base_config["trained_on"]["domain"] == "base"


def test_second_repro_runs_nothing(pipeline_repo: Path, pipeline_env: dict) -> None:
    again = run_command(["dvc", "repro"], pipeline_repo, pipeline_env)
    assert ran_stages(again.stdout) == []
    status = run_command(["dvc", "status"], pipeline_repo, pipeline_env)
    assert "up to date" in status.stdout


def test_mlflow_store_at_repo_root_holds_each_stage(pristine_repo: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pristine_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {run.data.tags["stage"]: run for run in runs if "stage" in run.data.tags}
    assert sorted(by_stage) == sorted(PIPELINE_STAGES)
    train = by_stage["train"]
    assert train.data.params["train.epochs"] == "50"
    epochs_run = read_json(pristine_repo, "metrics/train.json")["epochs_run"]
    history = client.get_metric_history(train.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, epochs_run + 1))
    logged = by_stage["evaluate"].data.metrics["finetuned.accuracy"]
    assert logged == read_json(pristine_repo, "metrics/evaluate.json")["finetuned"]["accuracy"]


def test_dvc_views_work(pipeline_repo: Path, pipeline_env: dict) -> None:
    dag = run_command(["dvc", "dag"], pipeline_repo, pipeline_env).stdout
    assert all(stage in dag for stage in PIPELINE_STAGES)
    shown = run_command(["dvc", "metrics", "show", "--json"], pipeline_repo, pipeline_env)
    workspace = json.loads(shown.stdout)[""]["data"]["metrics/evaluate.json"]["data"]
    assert workspace == read_json(pipeline_repo, "metrics/evaluate.json")
    out = pipeline_repo / "plots_html"
    run_command(["dvc", "plots", "show", "-o", str(out)], pipeline_repo, pipeline_env)
    page = (out / "index.html").read_text()
    assert "plots/train.csv" in page and "val_loss" in page


def test_exp_run_of_a_finetune_param_reruns_finetune_and_evaluate_only(
    finetune_experiment, pipeline_env: dict
) -> None:
    repo = finetune_experiment.repo
    assert ran_stages(finetune_experiment.output) == ["finetune", "evaluate"]
    after = read_json(repo, "metrics/finetune.json")
    # A different lr trained differently.
    assert after["train_loss"] != finetune_experiment.before["finetune"]["train_loss"]
    shown = run_command(["dvc", "exp", "show", "--csv"], repo, pipeline_env).stdout
    assert "finetune.lr" in shown and "0.005" in shown
    diff = run_command(["dvc", "metrics", "diff", "main", "--json"], repo, pipeline_env)
    assert "metrics/finetune.json" in json.loads(diff.stdout)


def test_exp_run_of_a_split_param_reruns_from_split(pipeline_repo: Path, pipeline_env) -> None:
    set_params(pipeline_repo, train={"epochs": 5}, finetune={"epochs": 20})  # keep it short
    # 5 epochs cannot meet the demo's gates; this test checks which stages rerun (the real gates:
    # test_cold_run_meets_the_readme_claims_with_the_real_gates), not the intervals.
    lean = {"draws": 2, "bootstrap_resamples": 200}
    set_params(pipeline_repo, evaluate={"min_base_accuracy": 0.5, "min_transfer_gain": -1.0} | lean)
    commit_all(pipeline_repo, pipeline_env, "short training")
    resplit = run_command(
        ["dvc", "exp", "run", "-S", "split.seed=1"],
        pipeline_repo,
        untracked(pipeline_env),
        check=False,
    )
    assert resplit.returncode == 0, resplit.stderr
    assert ran_stages(resplit.stdout) == ["split", "tokenize", "train", "finetune", "evaluate"]
    assert read_json(pipeline_repo, "metrics/train.json")["epochs_run"] == 5


def test_editing_ingest_code_reruns_ingest_alone(pipeline_repo: Path, pipeline_env: dict) -> None:
    """Ingest's core module is a dependency of ingest only: an edit reruns ingest, whose output
    comes out byte-identical, so DVC skips every later stage."""
    module = pipeline_repo / "stages/core/data/ingest.py"
    module.write_text(module.read_text() + "\n# a change\n")
    rerun = run_command(["dvc", "repro"], pipeline_repo, untracked(pipeline_env))
    assert ran_stages(rerun.stdout) == ["ingest"]
    assert "Stage 'validate' didn't change, skipping" in rerun.stdout


def test_editing_a_shared_module_makes_every_stage_that_imports_it_stale(
    pipeline_repo: Path, pipeline_env: dict
) -> None:
    """stages/core/common/schema.py (the reserved column names) is imported by every stage: a
    change to it reruns all six, while a change to the fine-tuning code leaves ingest ... train
    alone."""
    module = pipeline_repo / "stages/core/common/schema.py"
    module.write_text(module.read_text() + "\n# a change\n")
    dry = run_command(["dvc", "repro", "--dry"], pipeline_repo, pipeline_env)
    assert ran_stages(dry.stdout) == PIPELINE_STAGES
    run_command(
        ["git", "checkout", "--", "stages/core/common/schema.py"], pipeline_repo, pipeline_env
    )
    module = pipeline_repo / "stages/core/modeling/finetuning.py"
    module.write_text(module.read_text() + "\n# a change\n")
    dry = run_command(["dvc", "repro", "--dry"], pipeline_repo, pipeline_env)
    assert ran_stages(dry.stdout) == ["finetune", "evaluate"]


def test_stale_pipeline_check_catches_uncommitted_results(
    pipeline_repo: Path, pipeline_env: dict, tmp_path: Path
) -> None:
    """`.ci/stale-pipeline` on a clone (no outputs, no cache) passes while dvc.lock matches the
    code and params, and names the stage once a param changes without a rerun."""
    check = [str(REPO_ROOT / ".ci/stale-pipeline")]
    clone = tmp_path / "clone"
    run_command(["git", "clone", "-q", str(pipeline_repo), str(clone)], tmp_path, pipeline_env)
    fresh = run_command(check, clone, pipeline_env, check=False)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    set_params(clone, finetune={"lr": 0.02})
    stale = run_command(check, clone, pipeline_env, check=False)
    assert stale.returncode == 1
    assert "finetune" in stale.stdout and "dvc repro" in stale.stdout


def test_a_failing_gate_stops_the_stage_with_its_outputs_written(
    pipeline_repo: Path, pipeline_env: dict
) -> None:
    """validate with a range the digits exceed: exit 1, one line naming the param, the
    quarantined rows written with their reasons, and dvc.lock still recording the last good
    run."""
    validate_before = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())["stages"]["validate"]
    set_params(pipeline_repo, validate={"feature_range": [0, 15]})
    failed = run_command(
        ["dvc", "repro", "validate"], pipeline_repo, untracked(pipeline_env), check=False
    )
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("validate: error")]
    pixels = pd.read_parquet(pipeline_repo / "data/raw/dataset.parquet").filter(like="pixel")
    outside = int(((pixels < 0) | (pixels > 15)).any(axis=1).sum())
    assert outside > 0.05 * 1797  # enough to fail the gate
    assert errors == [
        f"validate: error: validate.max_quarantine_fraction: {outside} of 1797 rows "
        f"({outside / 1797:.1%}) quarantined, more than 5.0%; "
        "see data/quarantine/rejected.parquet"
    ]
    assert "Traceback" not in failed.stderr
    rejected = pd.read_parquet(pipeline_repo / "data/quarantine/rejected.parquet")
    assert len(rejected) == outside
    assert rejected["reason"].str.contains("outside \\[0, 15\\]").all()
    report = read_json(pipeline_repo, "reports/validation.json")
    assert (report["rows_clean"], report["passed"]) == (1797 - outside, False)
    # ingest reran (its rendering reads the range too); validate's last good run stays locked.
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())["stages"]
    assert lock["validate"] == validate_before


def test_forced_repro_is_byte_identical(pipeline_repo: Path, pipeline_env: dict) -> None:
    """Every output again, byte for byte; the first run logged to MLflow, this one does not:
    what the pipeline computes does not depend on tracking."""
    before = lock_outs(pipeline_repo)
    metrics_before = (pipeline_repo / "metrics/evaluate.json").read_text()
    forced = run_command(["dvc", "repro", "-f"], pipeline_repo, untracked(pipeline_env))
    assert ran_stages(forced.stdout) == PIPELINE_STAGES
    assert lock_outs(pipeline_repo) == before
    assert (pipeline_repo / "metrics/evaluate.json").read_text() == metrics_before
