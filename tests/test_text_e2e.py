"""End to end on text: a generated CSV whose labels are learnable from its words and a tiny
BERT checkpoint built here (tests/tiny_text.py), through all six stages with `dvc repro` and
MLflow tracking, then the champion loaded from the registry and asked about raw texts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    PIPELINE_STAGES,
    REPO_ROOT,
    new_project_repo,
    ran_stages,
    run_command,
    set_params,
)
from tiny_text import build_bert, labelled_texts

pytestmark = pytest.mark.e2e

MODEL = "text-classifier"
ROWS = 150


def unique_texts(n: int) -> pd.DataFrame:
    """``n`` distinct texts (the gate quarantines duplicates) labelled pos / neg by their words."""
    texts, labels = labelled_texts(4 * n, seed=7)
    frame = pd.DataFrame({"review": texts, "sentiment": labels}).drop_duplicates("review")
    return frame.groupby("sentiment", group_keys=False).head(n // 2).reset_index(drop=True)


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory, pipeline_env: dict, empty_store) -> tuple[Path, str]:
    """A project repo with a text CSV and a tiny BERT under data/, after one `dvc repro`."""
    repo = new_project_repo(tmp_path_factory.mktemp("text"), pipeline_env, empty_store)
    (repo / "data/source").mkdir(parents=True, exist_ok=True)
    unique_texts(ROWS).to_csv(repo / "data/source/reviews.csv", index=False)
    build_bert(repo / "data/pretrained/tiny-bert")
    set_params(
        repo,
        data={"source": "data/source/reviews.csv", "text_column": "review",
              "label": "sentiment", "features": None, "image_shape": None},
        model={"arch": "hf", "pretrained": "data/pretrained/tiny-bert", "max_length": 32},
        train={"epochs": 8, "batch_size": 16, "lr": 0.003, "patience": None,
               "checkpoint_every": None},
        finetune={"shots_per_class": None, "strategy": "full", "epochs": 4, "batch_size": 16,
                  "lr": 0.003, "checkpoint_every": None},
        evaluate={"draws": 2, "min_base_accuracy": 0.99, "min_transfer_gain": -1.0,
                  "min_class_recall": 0.6, "bootstrap_resamples": 200},
        tracking={"registered_model": MODEL},
    )  # fmt: skip
    env = pipeline_env | {"PIPELINE_TRACKING": "on", "HF_HUB_OFFLINE": "1"}
    out = run_command(["dvc", "repro"], repo, env)
    return repo, out.stdout


def test_text_pipeline_trains_evaluates_and_registers(text_repo) -> None:
    repo, output = text_repo
    assert ran_stages(output) == PIPELINE_STAGES, output
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["truncated_rows"] == 0 and train["parameters"] > 1000
    assert pd.read_csv(repo / "plots/train.csv").shape[0] == 8
    tuned_metrics = json.loads((repo / "metrics/finetune.json").read_text())
    # shots_per_class null: every row of the (one-domain) train split
    split_rows = len(pd.read_parquet(repo / "data/splits/target_train.parquet"))
    assert tuned_metrics["shots"] == split_rows > 50
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    # Two balanced classes: chance is 0.5; the words decide the label.
    assert metrics["finetuned"]["accuracy"] >= 0.8, metrics["finetuned"]
    assert metrics["finetuned"]["roc_auc_ovr"] > 0.8
    # Everything evaluate reports for the digits, with intervals and calibration, for text too.
    digits = json.loads((REPO_ROOT / "metrics/evaluate.json").read_text())
    assert set(metrics["finetuned"]) >= set(digits["finetuned"])
    assert set(metrics["finetuned"]["per_class"]) == {"neg", "pos"}
    assert metrics["sklearn"]["accuracy"] >= 0.8  # TF-IDF sees the same words
    assert "accuracy" in metrics["scratch"] and metrics["transfer"]["draws"] == 2
    assert "zero_shot" not in metrics  # one domain: nothing to transfer zero-shot
    report = (repo / "reports/evaluation.md").read_text()
    assert "## Most confident mistakes" in report
    # No base gate on one domain (0.99 would fail it); the others apply.
    assert "evaluate.min_base_accuracy" not in report
    assert "evaluate.min_class_recall" in report


def test_the_champion_predicts_raw_texts(text_repo) -> None:
    import mlflow
    import mlflow.pyfunc

    repo, _ = text_repo
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.tags["gates"] == "passed"
        # MLflow's own evaluation of the version, on the raw test texts
        evaluation = client.get_run(champion.tags["evaluate_run_id"]).data.metrics
        assert evaluation["accuracy_score"] == pytest.approx(
            json.loads((repo / "metrics/evaluate.json").read_text())["finetuned"]["accuracy"]
        )
        pipeline_meta = json.loads((repo / "models/base/pipeline.json").read_text())
        assert champion.tags["base.pretrained"] == "data/pretrained/tiny-bert"
        assert champion.tags["base.sha256"] == pipeline_meta["provenance"]["sha256"]
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        inputs = model.metadata.get_input_schema().inputs
        assert [i.type.name for i in inputs] == ["string"]
        texts = ["it was great and good", "awful bad day", "the food was terrible and sad"]
        frame = pd.DataFrame({"review": texts}, index=[10, 11, 12])
        labels = model.predict(frame)
        assert list(labels.index) == [10, 11, 12]
        assert list(labels) == ["pos", "neg", "neg"]
        assert list(model.predict(texts)) == ["pos", "neg", "neg"]
        proba = model.predict(frame, params={"probabilities": True})
        assert list(proba.columns) == ["neg", "pos"] and proba.index.tolist() == [10, 11, 12]
        assert proba.sum(axis=1).round(6).tolist() == [1.0, 1.0, 1.0]
        artifacts = [a.path for a in client.list_artifacts(champion.run_id)]
        assert not any(p.endswith((".pkl", ".pickle")) for p in artifacts)
    finally:
        mlflow.set_tracking_uri(None)


def test_mlflow_models_serve_answers_raw_texts(text_repo, pipeline_env, tmp_path) -> None:
    """`mlflow models serve` of the champion: a JSON request of raw texts, labels back."""
    from test_mlflow_e2e import as_labels, serve_and_ask

    repo, _ = text_repo
    env = pipeline_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    rows = pd.DataFrame({"review": ["it was great and good", "awful bad day"]})
    (served,) = serve_and_ask(f"models:/{MODEL}@champion", rows, env, tmp_path / "serve.log")
    assert as_labels(served) == ["pos", "neg"]


def test_a_lora_adapter_is_registered_whole(text_repo, pipeline_env) -> None:
    """finetune.lora.save: adapter keeps no merged weights: the registered model carries the
    base checkpoint beside the adapter and predicts what the adapter on models/base predicts.
    (Last in this file: it changes the shared repo.)"""
    import mlflow
    import mlflow.pyfunc

    from stages.core.modeling.text import load_text_model, predict_texts

    repo, _ = text_repo
    # One shot draw: this test reads the registered model, not the transfer comparison.
    set_params(
        repo, finetune={"strategy": "lora", "lora": {"save": "adapter"}}, evaluate={"draws": 1}
    )
    env = pipeline_env | {"PIPELINE_TRACKING": "on", "HF_HUB_OFFLINE": "1"}
    out = run_command(["dvc", "repro"], repo, env, check=False)  # the gates may fail: a candidate
    assert ran_stages(out.stdout) == ["finetune", "evaluate"], out.stdout + out.stderr
    tuned = repo / "models/finetuned"
    assert (tuned / "adapter/adapter_model.safetensors").is_file()
    assert not (tuned / "model.safetensors").exists()
    texts = ["it was great and good", "awful bad day"]
    model, tokenizer, config = load_text_model(tuned, base=repo / "models/base")
    expected = predict_texts(model, tokenizer, texts, config.max_length).numpy()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
        proba = served.predict(texts, params={"probabilities": True})
    finally:
        mlflow.set_tracking_uri(None)
    assert list(proba.columns) == config.classes
    assert proba.to_numpy() == pytest.approx(expected, abs=1e-6)


def test_objective_none_takes_the_checkpoint_and_drops_the_base_block(
    text_repo, pipeline_env
) -> None:
    """train.objective none with the head strategy: models/base is the checkpoint as it is,
    train writes no epochs, and evaluate has no base block (its head never trained). Changes
    the shared repo: runs after the tests that read it."""
    repo, _ = text_repo
    set_params(repo, train={"objective": "none"}, finetune={"strategy": "head", "epochs": 20})
    # Nothing here reads MLflow: tracking off spares each stage the store and evaluate the
    # registration and MLflow's own evaluation of the model.
    env = pipeline_env | {"PIPELINE_TRACKING": "off", "HF_HUB_OFFLINE": "1"}
    out = run_command(["dvc", "repro"], repo, env, check=False)  # the gates may fail
    assert ran_stages(out.stdout) == ["train", "finetune", "evaluate"], out.stdout + out.stderr
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["objective"] == "none" and train["epochs_run"] == 0
    assert pd.read_csv(repo / "plots/train.csv").empty
    meta = json.loads((repo / "models/base/pipeline.json").read_text())
    assert (
        meta["trained_on"] == {} and meta["provenance"]["pretrained"] == "data/pretrained/tiny-bert"
    )
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert "base" not in metrics and "zero_shot" not in metrics
    assert metrics["finetuned"]["support"] == len(
        pd.read_parquet(repo / "data/splits/target_test.parquet")
    )
    assert json.loads((repo / "metrics/finetune.json").read_text())["epochs_run"] == 20


def test_a_language_model_pretrained_here_from_a_corpus(text_repo, pipeline_env) -> None:
    """corpus -> tokenizer -> a BERT pretrained from scratch (mlm) -> fine-tuned classifier ->
    evaluation, as one DVC graph: a corpus text that is also a test text is quarantined, the
    registered version names its tokenizer, and a finetune param reruns finetune and evaluate
    only (never the tokenizer or the pretraining). Last in this file: it changes the repo."""
    import mlflow

    repo, _ = text_repo
    test_texts = pd.read_parquet(repo / "data/splits/target_test.parquet")["text"].tolist()
    corpus, _ = labelled_texts(300, seed=11)
    (repo / "data/source/corpus.txt").write_text("\n".join([*corpus, test_texts[0]]) + "\n")
    set_params(
        repo,
        data={"corpus": "data/source/corpus.txt"},
        model={"pretrained": None, "tokenizer": {"kind": "wordpiece", "vocab_size": 200},
               "hf": {"model_type": "bert", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                      "intermediate_size": 64, "max_positions": 64}},
        train={"objective": "mlm", "block_size": 32, "epochs": 3, "lr": 0.003},
        finetune={"strategy": "full", "epochs": 4},
        evaluate={"draws": 1},
    )  # fmt: skip
    env = pipeline_env | {"PIPELINE_TRACKING": "on", "HF_HUB_OFFLINE": "1"}
    out = run_command(["dvc", "repro"], repo, env, check=False)  # the gates may fail
    ran = ran_stages(out.stdout)
    # The corpus file is new in data/source, which ingest reads: ingest reruns, writes the same
    # table, and validate and split are skipped.
    assert ran == ["ingest", "tokenize", "train", "finetune", "evaluate"], out.stdout + out.stderr
    report = json.loads((repo / "data/corpus/report.json").read_text())["corpus"]
    assert report["quarantined"]["in_val_or_test"] == 1, report
    clean = pd.read_parquet(repo / "data/corpus/corpus.parquet")["text"].tolist()
    assert test_texts[0] not in clean and len(clean) == report["rows_clean"]
    assert json.loads((repo / "models/tokenizer/tokenizer_info.json").read_text())["trained"]
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["texts"]["train"] == len(clean) and train["texts"]["held_out"] == 0
    history = pd.read_csv(repo / "plots/train.csv")
    assert len(history) == 3 and history["val_perplexity"].iloc[-1] < history["val_perplexity"][0]
    meta = json.loads((repo / "models/base/pipeline.json").read_text())
    assert (
        meta["format"] == "hf-masked-lm" and meta["provenance"]["pretrained"] == "pretrained here"
    )
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert "base" not in metrics and {"finetuned", "scratch", "sklearn"} <= metrics.keys()
    assert "this run's objective is mlm" in (repo / "reports/samples.md").read_text()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        version = client.get_model_version_by_alias(MODEL, "candidate")
        assert version.tags["base.pretrained"] == "pretrained here"
        assert version.tags["base.tokenizer_md5"] == meta["provenance"]["tokenizer_md5"]
    finally:
        mlflow.set_tracking_uri(None)
    set_params(repo, finetune={"epochs": 3})
    again = run_command(["dvc", "repro"], repo, pipeline_env | {"PIPELINE_TRACKING": "off"},
                        check=False)  # fmt: skip
    assert ran_stages(again.stdout) == ["finetune", "evaluate"], again.stdout + again.stderr
