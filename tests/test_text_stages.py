"""The text path of train, finetune and evaluate (stages/core/modeling/text_training.py,
stages/core/evaluation/text_scoring.py) on tiny checkpoints built in the tests, and what the
evaluation and tracking code does differently for text models."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_EXPERIMENT
from tiny_text import labelled_texts

from stages.core.common.errors import ParamsError
from stages.core.common.params import parse_params
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.evaluation.gates import gates
from stages.core.evaluation.report import render_report
from stages.core.evaluation.scoring import Scored
from stages.core.evaluation.text_scoring import (
    confident_mistakes,
    score_text_model,
    tfidf_baseline,
)
from stages.core.modeling.finetuning import finetune_text, sample_shots
from stages.core.modeling.text import load_text_model, save_text_model, with_new_head
from stages.core.modeling.text_training import train_text


def split(n: int, seed: int) -> pd.DataFrame:
    texts, labels = labelled_texts(n, seed)
    return pd.DataFrame({TEXT: texts, LABEL: labels, DOMAIN: "base"})


def text_params(checkpoint, **sections):
    raw = {
        "data": {"text_column": "review", "features": None},
        "model": {"arch": "hf", "pretrained": str(checkpoint), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "checkpoint_every": None},
        "finetune": {"shots_per_class": None, "epochs": 2, "batch_size": 16, "lr": 0.003},
    }
    for key, values in sections.items():
        raw[key] = raw.get(key, {}) | values
    return parse_params(raw)


def test_shots_per_class_null_takes_every_row() -> None:
    frame = split(30, seed=1).sample(frac=1, random_state=0)
    shots = sample_shots(frame, None, seed=3)
    assert shots[TEXT].tolist() == frame[TEXT].tolist()
    assert list(shots.index) == list(range(30))


def test_lora_save_is_a_param() -> None:
    assert parse_params({}).finetune.lora.save == "merged"
    assert parse_params({"finetune": {"lora": {"save": "both"}}}).finetune.lora.save == "both"
    with pytest.raises(ParamsError, match="finetune.lora.save"):
        parse_params({"finetune": {"lora": {"save": "pickle"}}})


def test_objective_none_takes_the_checkpoint_as_it_is(tiny_checkpoints, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    checkpoint = tiny_checkpoints["bert"]
    params = text_params(checkpoint, train={"objective": "none"})
    run = train_text(params, split(20, 1), split(10, 2))
    assert run.result is None and run.trainable_parameters == 0
    saved = save_text_model(tmp_path / "base", run.model, run.tokenizer, run.config)
    weights = (checkpoint / "model.safetensors").read_bytes()
    assert saved.provenance == {
        "pretrained": str(checkpoint),
        "revision": None,
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    assert saved.classes == ["neg", "pos"] and saved.text_column == "review"
    # The body is the checkpoint's, unchanged.
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    original = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    body = reloaded.bert.embeddings.word_embeddings.weight
    assert body.equal(original.bert.embeddings.word_embeddings.weight)


def test_classify_then_finetune_learn_the_words(tiny_checkpoints, tmp_path) -> None:
    params = text_params(
        tiny_checkpoints["bert"],
        train={"epochs": 12, "patience": None},
        finetune={"strategy": "full", "epochs": 6},
    )
    train, val, test = split(120, 1), split(40, 2), split(60, 3)
    base = train_text(params, train, val)
    assert len(base.result.history) == 12 and base.truncated == 0
    assert base.config.trained_on == {"domain": "base", "rows": 120}
    save_text_model(tmp_path / "base", base.model, base.tokenizer, base.config)
    model, tokenizer, config = load_text_model(tmp_path / "base")
    tuned = finetune_text(model, tokenizer, config, train, val, params, seed=5)
    scored = score_text_model(tuned.model, tokenizer, tuned.config, test)
    accuracy = float((scored.pairs["actual"] == scored.pairs["predicted"]).mean())
    assert accuracy >= 0.8  # two balanced classes: chance is 0.5
    assert np.allclose(scored.proba.sum(axis=1), 1)
    scratch = finetune_text(model, tokenizer, config, train, val, params, 5, keep_body=False)
    assert scratch.config.trained_on["domain"] == "shots only"
    # From random weights: the body differs from the base's.
    tuned_body = tuned.model.hf.bert.embeddings.word_embeddings.weight
    assert not scratch.model.hf.bert.embeddings.word_embeddings.weight.equal(tuned_body)


def test_a_scratch_control_of_the_same_strategy_trains_a_head_on_random_features(
    tiny_checkpoints,
) -> None:
    """evaluate.scratch_strategy same with finetune.strategy head: the random body stays as it
    was drawn and only the head trains; full (the default) trains every layer. Both read the
    body with finetune.pooling."""
    model, tokenizer, config = load_text_model_from(tiny_checkpoints["bert"])
    train, val = split(40, 1), split(20, 2)
    runs = {}
    for control in ("same", "full"):
        params = text_params(
            tiny_checkpoints["bert"],
            finetune={"strategy": "head", "pooling": "mean", "epochs": 3},
            evaluate={"scratch_strategy": control},
        )
        runs[control] = finetune_text(
            model, tokenizer, config, train, val, params, 5, keep_body=False
        )
    same, full = runs["same"], runs["full"]
    assert same.model.pooling == full.model.pooling == same.config.pooling == "mean"
    head = sum(p.numel() for p in same.model.hf.classifier.parameters())
    assert same.trainable_parameters == head
    # Every layer but BERT's pooler, which mean pooling never reads.
    pooler = sum(p.numel() for p in full.model.hf.bert.pooler.parameters())
    assert full.trainable_parameters == sum(p.numel() for p in full.model.parameters()) - pooler
    # Same seed, same random draw: the frozen body is the one drawn, the trained one moved.
    drawn = with_new_head(model, config, ["neg", "pos"], 5, keep_body=False)[0].hf.bert
    assert drawn.embeddings.word_embeddings.weight.equal(
        same.model.hf.bert.embeddings.word_embeddings.weight
    )
    assert not drawn.embeddings.word_embeddings.weight.equal(
        model.hf.bert.embeddings.word_embeddings.weight
    )
    assert not full.model.hf.bert.embeddings.word_embeddings.weight.equal(
        drawn.embeddings.word_embeddings.weight
    )


def load_text_model_from(checkpoint):
    from stages.core.common.params import ModelParams
    from stages.core.modeling.text import load_pretrained

    return load_pretrained(ModelParams(arch="hf", pretrained=str(checkpoint)), ["neg", "pos"], TEXT)


def test_tfidf_baseline_reads_the_words() -> None:
    predicted = tfidf_baseline(split(80, 1), split(40, 2))
    assert list(predicted.columns) == ["actual", "predicted"]
    assert (predicted["actual"] == predicted["predicted"]).mean() >= 0.9


def test_confident_mistakes_are_the_surest_wrong_rows() -> None:
    pairs = pd.DataFrame({"actual": ["a", "b", "a", "b"], "predicted": ["b", "b", "b", "a"]})
    proba = np.array([[0.4, 0.6], [0.1, 0.9], [0.05, 0.95], [0.7, 0.3]])
    texts = ["short one", "right", "x " * 100, "third"]
    rows = confident_mistakes(Scored(pairs, proba, ["a", "b"]), texts, shown=2)
    assert [r["confidence"] for r in rows] == [0.95, 0.7]
    assert rows[0]["text"].endswith("…") and len(rows[0]["text"]) == 80
    assert (rows[1]["actual"], rows[1]["predicted"], rows[1]["text"]) == ("b", "a", "third")


def metrics_block(accuracy: float) -> dict:
    return {"accuracy": accuracy, "worst_class_recall": 0.9, "worst_class": "a"}


def test_one_domain_has_no_base_gate() -> None:
    params = parse_params({}).evaluate
    metrics = {
        "base": metrics_block(0.5),
        "finetuned": metrics_block(0.9),
        "transfer": {"gain_mean": 0.1, "draws": 2},
    }
    assert [g.key for g in gates(metrics, params)][0] == "min_base_accuracy"
    kept = [g.key for g in gates(metrics, params, base_gate=False)]
    assert kept == ["min_transfer_gain", "min_class_recall"]
    del metrics["base"]
    assert [g.key for g in gates(metrics, params)] == kept


def test_the_report_shows_the_mistakes_and_all_rows(tmp_path) -> None:
    from stages.core.evaluation.baselines import Draw
    from stages.core.evaluation.results import evaluation_metrics

    pairs = pd.DataFrame({"actual": ["a", "b", "a", "b"], "predicted": ["a", "b", "b", "b"]})
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    scored = Scored(pairs, proba, ["a", "b"])
    params = parse_params({"data": {"text_column": "t", "features": None},
                           "finetune": {"shots_per_class": None},
                           "evaluate": {"bootstrap_resamples": 100}})  # fmt: skip
    metrics = evaluation_metrics(
        None, scored, [Draw(42, pairs, pairs, pairs)], None, params.evaluate
    )
    assert "base" not in metrics and "zero_shot" not in metrics
    checked = gates(metrics, params.evaluate, base_gate=False)
    mistakes = [{"text": "a | b", "actual": "a", "predicted": "b", "confidence": 0.7}]
    report = render_report(metrics, checked, params, {}, mistakes)
    assert "fine-tuned on all labelled examples per class" in report
    assert "## Most confident mistakes" in report
    assert "| sklearn | TF-IDF + logistic regression on the same shots |" in report
    assert (
        "The fine-tuned model beats scikit-learn's logistic regression (`sklearn`) fitted on the "
        "same shots by **+0.000** accuracy, averaged over 1 draws of the same shots (no interval "
        "with a single draw; worst draw +0.000; means 0.750 against 0.750)."
    ) in report
    assert "| a \\| b | a | b | 0.700 |" in report
    confidence = report.split("## Confidence")[1].split("## Gates")[0]
    assert "| finetuned |" in confidence and "| base |" not in confidence
    assert "evaluate.min_base_accuracy" not in report


def test_long_params_and_provenance_fit_mlflow(mlflow_client, tmp_path) -> None:
    from mlflow.entities import Param

    from stages.core.tracking.recorder import PARAM_LIMIT, param_value
    from stages.core.tracking.registry import provenance_tags

    experiment = mlflow_client.get_experiment_by_name(TEST_EXPERIMENT)
    run = mlflow_client.create_run(experiment.experiment_id)
    long = {str(i): f"label number {i}" for i in range(1000)}  # an id2label
    value = param_value(long)
    assert len(str(long)) > PARAM_LIMIT and len(value) == PARAM_LIMIT
    assert value.endswith(f"({len(str(long))} characters in all)")
    mlflow_client.log_batch(run.info.run_id, params=[Param("model.id2label", value)])
    assert mlflow_client.get_run(run.info.run_id).data.params["model.id2label"] == value
    (tmp_path / "pipeline.json").write_text(
        json.dumps({"provenance": {"pretrained": "x" * 9000, "revision": None, "sha256": "ab"}})
    )
    tags = provenance_tags(str(tmp_path))
    assert tags["base.revision"] == "null" and tags["base.sha256"] == "ab"
    assert len(tags["base.pretrained"]) == 5000


def test_an_adapter_saved_from_a_loaded_base_reloads(tiny_checkpoints, tmp_path) -> None:
    """The fine-tuned config starts as a copy of the base's, whose weights' sha256 must not
    follow it into an adapter-only directory (it has no merged weights to match)."""
    params = text_params(tiny_checkpoints["bert"], finetune={"strategy": "lora", "epochs": 1})
    base = train_text(params, split(20, 1), split(10, 2))
    save_text_model(tmp_path / "base", base.model, base.tokenizer, base.config)
    model, tokenizer, config = load_text_model(tmp_path / "base")
    tuned = finetune_text(model, tokenizer, config, split(20, 1), split(10, 2), params, seed=1)
    saved = save_text_model(
        tmp_path / "tuned", tuned.model, tokenizer, tuned.config, "adapter", tmp_path / "base"
    )
    assert saved.weights_sha256 == "" and saved.adapter["base"] == str(tmp_path / "base")
    reloaded, _, _ = load_text_model(tmp_path / "tuned")
    assert hasattr(reloaded.hf, "peft_config")
