"""The evaluate stage end to end in-process: real small splits and models, a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from stages import evaluate
from stages.core.common import layout
from stages.core.common.cli import run_stage
from stages.core.common.io import write_csv, write_parquet
from stages.core.common.params import parse_params
from stages.core.engine.training import FitOptions, fit, history_rows
from stages.core.modeling.finetuning import fine_tune, sample_shots
from stages.core.modeling.model import Classifier, ModelConfig, encode, fit_scaling, save_model

FEATURES = ["f0", "f1", "f2", "f3"]
PARAMS = {
    "model": {"scaling": "per_feature", "hidden": [16]},
    "train": {"device": "cpu", "epochs": 30},
    "finetune": {"shots_per_class": 3, "epochs": 20, "seed": 7},
    # Gates a passing run clears on this synthetic data; the failing-gate tests below set
    # thresholds it cannot meet.
    "evaluate": {
        "min_base_accuracy": 0.5,
        "min_transfer_gain": -1.0,
        "draws": 2,
        "bootstrap_resamples": 200,
    },
    "tracking": {"experiment": "unit-tests"},
}
OUTPUTS = [
    "metrics/evaluate.json",
    "plots/confusion.csv",
    "plots/roc.csv",
    "plots/precision_recall.csv",
    "plots/per_class/base.csv",
    "plots/per_class/finetuned.csv",
    "plots/per_class/scratch.csv",
    "reports/evaluation.md",
    "reports/figures/confusion_finetuned.png",
    "reports/figures/training_curves.png",
    "reports/figures/per_class_recall.png",
    "reports/figures/reliability_finetuned.png",
]


def _split(n_per_class: int, seed: int, domain: str, shift: float) -> pd.DataFrame:
    """Three overlapping classes (no model here is perfect), shifted in the target domain."""
    centres = np.random.default_rng(0).normal(0, 1.5, size=(3, len(FEATURES)))
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per_class, len(FEATURES))) for c in centres])
    frame = pd.DataFrame(x + shift, columns=FEATURES)
    frame["label"] = np.repeat([0, 1, 2], n_per_class)
    frame["domain"] = domain
    return frame


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """What the evaluate stage reads: splits of two domains, a trained base model, a model
    fine-tuned from it on a few target shots, and the two training histories."""
    root = tmp_path_factory.mktemp("evaluate-inputs")
    params = parse_params(PARAMS)
    splits = {}
    for role, shift in (("base", 0.0), ("target", 1.5)):
        for i, (part, n) in enumerate((("train", 20), ("val", 5), ("test", 12))):
            splits[role, part] = _split(
                n, seed=10 * i + (role == "target"), domain=role, shift=shift
            )
            write_parquet(root / layout.split_path(role, part), splits[role, part])
    train = splits["base", "train"]
    mean, std = fit_scaling(train[FEATURES].to_numpy(), "per_feature")
    config = ModelConfig("mlp", 4, [16], 0.0, [0, 1, 2], FEATURES, mean, std)
    torch.manual_seed(0)
    base = Classifier(config)
    options = FitOptions(epochs=30, batch_size=16, lr=0.01, device="cpu")
    result = fit(base, encode(train, config), encode(splits["base", "val"], config), options)
    save_model(root / layout.BASE_MODEL, base, config)
    write_csv(root / layout.TRAIN_PLOT, pd.DataFrame(history_rows(result)))
    shots = sample_shots(splits["target", "train"], 3, 7)
    tuned, tuned_config, tuned_result = fine_tune(
        base, config, shots, splits["target", "val"], params, 7
    )
    save_model(root / layout.FINETUNED_MODEL, tuned, tuned_config)
    write_csv(root / layout.FINETUNE_PLOT, pd.DataFrame(history_rows(tuned_result)))
    return root


def _project(inputs: Path, where: Path, **evaluate_params) -> None:
    shutil.copytree(inputs, where, dirs_exist_ok=True)
    params = PARAMS | {"evaluate": PARAMS["evaluate"] | evaluate_params}
    (where / "params.yaml").write_text(yaml.safe_dump(params))


def _evaluate_runs(mlflow_client) -> list:
    experiment = mlflow_client.get_experiment_by_name("unit-tests")
    runs = mlflow_client.search_runs(
        [experiment.experiment_id], "tags.stage = 'evaluate'", order_by=["start_time DESC"]
    )
    return runs


def test_failed_gate_writes_every_output_then_exits_1(
    inputs, isolated_env, capfd, mlflow_client
) -> None:
    _project(inputs, isolated_env, min_transfer_gain=1.0)
    before = len(_evaluate_runs(mlflow_client))
    with pytest.raises(SystemExit) as caught:
        run_stage("evaluate", evaluate.main)
    assert caught.value.code == 1
    out, err = capfd.readouterr()
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    gain = metrics["transfer"]["gain_mean"]
    assert err == (
        "evaluate: error: evaluate.min_transfer_gain: transfer.gain_mean (finetuned - scratch "
        f"accuracy, mean over 2 draws) {gain:.4f} < 1.0\n"
    )
    for path in OUTPUTS:
        assert Path(path).is_file(), path
    report = Path("reports/evaluation.md").read_text()
    assert "| `evaluate.min_transfer_gain` |" in report and "**failed**" in report
    assert "- evaluate.min_transfer_gain: transfer.gain_mean" in report
    assert out.startswith("# Evaluation\n")  # the report is printed, then the stage fails

    runs = _evaluate_runs(mlflow_client)
    assert len(runs) == before + 1
    run = runs[0]
    assert run.info.status == "FAILED"  # the gate failed, after everything was logged
    logged = run.data.metrics
    assert logged["finetuned.accuracy"] == metrics["finetuned"]["accuracy"]
    assert logged["transfer.gain_mean"] == gain
    # MLflow's own classifier evaluation of the fine-tuned model, beside ours
    tuned = metrics["finetuned"]
    assert logged["accuracy_score"] == pytest.approx(tuned["accuracy"], abs=1e-6)
    assert logged["recall_score"] == pytest.approx(tuned["recall_macro"], abs=1e-6)
    assert logged["f1_score"] == pytest.approx(tuned["f1_macro"], abs=1e-6)
    assert logged["roc_auc"] == pytest.approx(tuned["roc_auc_ovr"], abs=1e-6)
    assert logged["log_loss"] == pytest.approx(tuned["log_loss"], abs=1e-6)
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"evaluation.md", "figures", "plots", "confusion_matrix.png"} <= artifacts
    assert "per_class_metrics.csv" in artifacts
    figures = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {f"figures/{Path(p).name}" for p in OUTPUTS if p.endswith(".png")}


def test_passing_run_writes_the_same_bytes_twice(inputs, isolated_env, capfd, monkeypatch) -> None:
    # Nothing here reads MLflow (the failed-gate test does): tracking off saves its seconds.
    monkeypatch.setenv("PIPELINE_TRACKING", "off")
    _project(inputs, isolated_env, min_class_recall=0.0)
    run_stage("evaluate", evaluate.main)
    first = {path: Path(path).read_bytes() for path in OUTPUTS}
    run_stage("evaluate", evaluate.main)
    assert {path: Path(path).read_bytes() for path in OUTPUTS} == first
    assert capfd.readouterr().err == ""
    metrics = json.loads(first["metrics/evaluate.json"])
    assert set(metrics) == {
        "base",
        "zero_shot",
        "finetuned",
        "scratch",
        "sklearn",
        "transfer_gain",
        "transfer",
        "versus_sklearn",
    }
    assert metrics["finetuned"]["support"] == metrics["base"]["support"] == 36
    # The same draws against scikit-learn: the fine-tuned side is the transfer summary's
    versus = metrics["versus_sklearn"]
    assert versus["draws"] == 2
    assert versus["finetuned_mean"] == metrics["transfer"]["finetuned_mean"]
    assert versus["gain_mean"] == pytest.approx(
        versus["finetuned_mean"] - versus["sklearn_mean"], abs=2e-6
    )
    assert metrics["transfer"]["draws"] == 2
    # Two draws with gains g1, g2: the t-interval of their mean is mean -+ t(0.975, 1) * |g1 - g2|
    # / 2 with t = 12.706205, and |g1 - g2| / 2 = mean - min
    transfer = metrics["transfer"]
    mean, spread = transfer["gain_mean"], transfer["gain_mean"] - transfer["gain_min"]
    assert mean == pytest.approx(transfer["finetuned_mean"] - transfer["scratch_mean"], abs=2e-6)
    assert transfer["gain_ci95_low"] == pytest.approx(mean - 12.706205 * spread, abs=1e-5)
    assert transfer["gain_ci95_high"] == pytest.approx(mean + 12.706205 * spread, abs=1e-5)
    per_class = pd.read_csv("plots/per_class/finetuned.csv")
    assert per_class.columns.tolist() == ["class", "precision", "recall", "f1", "support"]
    assert per_class["class"].tolist() == [0, 1, 2]
    assert per_class["recall"].tolist() == [
        metrics["finetuned"]["per_class"][str(c)]["recall"] for c in (0, 1, 2)
    ]
    roc = pd.read_csv("plots/roc.csv")
    assert roc.iloc[0].tolist() == [0.0, 0.0] and roc.iloc[-1].tolist() == [1.0, 1.0]
    report = first["reports/evaluation.md"].decode()
    for path in OUTPUTS:
        if path.endswith(".png"):
            assert f"](figures/{Path(path).name})" in report


def test_every_failed_gate_is_one_line_at_stage_level(
    inputs, isolated_env, capfd, monkeypatch
) -> None:
    monkeypatch.setenv("PIPELINE_TRACKING", "off")  # nothing here reads MLflow
    _project(inputs, isolated_env, min_base_accuracy=1.0, min_transfer_gain=1.0,
             min_class_recall=1.0)  # fmt: skip
    with pytest.raises(SystemExit) as caught:
        run_stage("evaluate", evaluate.main)
    assert caught.value.code == 1
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    tuned = metrics["finetuned"]
    assert metrics["base"]["accuracy"] < 1 and tuned["worst_class_recall"] < 1  # noisy data
    assert capfd.readouterr().err.splitlines() == [
        f"evaluate: error: evaluate.min_base_accuracy: base.accuracy "
        f"{metrics['base']['accuracy']:.4f} < 1.0",
        "evaluate: error: evaluate.min_transfer_gain: transfer.gain_mean (finetuned - scratch "
        f"accuracy, mean over 2 draws) {metrics['transfer']['gain_mean']:.4f} < 1.0",
        "evaluate: error: evaluate.min_class_recall: finetuned.worst_class_recall "
        f"(class {tuned['worst_class']}) {tuned['worst_class_recall']:.4f} < 1.0",
    ]
