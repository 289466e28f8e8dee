"""Evaluation: predictions as labels, scores, the baselines, the gates and the report."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_blobs, make_config, state_copy, states_equal

from stages.core.evaluation import (
    classical_baseline,
    compare_on_draws,
    failed_gates,
    predictions,
    render_report,
    scores,
    summarize_draws,
    train_scratch,
)
from stages.core.model import Classifier, ModelConfig
from stages.core.params import EvaluateParams
from stages.core.training import FitOptions

FEATURES = ["f0", "f1", "f2", "f3"]


def _frame(n_per_class: int, seed: int, labels=(0, 1, 2), noise: float = 0.0) -> pd.DataFrame:
    x, y = make_blobs(n_per_class, seed=seed)
    x = x.numpy().astype(np.float64)
    # Extra noise makes the classes overlap, so that scores depend on which rows trained.
    x += np.random.default_rng(seed).normal(0, noise, size=x.shape) if noise else 0
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["label"] = [labels[i] for i in y.tolist()]
    return frame


def _metrics(base=0.95, finetuned=0.9, scratch=0.8, zero_shot=True) -> dict:
    metrics = {
        "base": {"accuracy": base, "f1_macro": base - 0.01},
        "finetuned": {"accuracy": finetuned, "f1_macro": finetuned - 0.01},
        "scratch": {"accuracy": scratch, "f1_macro": scratch - 0.01},
        "sklearn": {"accuracy": 0.85, "f1_macro": 0.84},
        "transfer_gain": round(finetuned - scratch, 6),
        "transfer": summarize_draws(
            [{"finetuned": {"accuracy": finetuned}, "scratch": {"accuracy": scratch}}]
        ),
    }
    if zero_shot:
        metrics["zero_shot"] = {"accuracy": 0.01, "f1_macro": 0.02}
    return metrics


def test_scores() -> None:
    pairs = pd.DataFrame({"actual": [0, 0, 1, 1], "predicted": [0, 1, 1, 1]})
    # class 0: P=1, R=0.5, F1=2/3; class 1: P=2/3, R=1, F1=0.8
    assert scores(pairs) == {"accuracy": 0.75, "f1_macro": round((2 / 3 + 0.8) / 2, 6)}


def test_scores_of_string_labels() -> None:
    pairs = pd.DataFrame({"actual": ["a", "b", "c"], "predicted": ["a", "b", "c"]})
    assert scores(pairs) == {"accuracy": 1.0, "f1_macro": 1.0}


def test_predictions_are_class_labels() -> None:
    """A hand-wired net: class = the larger of two inputs."""
    config = ModelConfig(
        arch="mlp",
        n_features=2,
        hidden=[2],
        dropout=0.0,
        classes=["cat", "dog"],
        feature_names=["f0", "f1"],
        mean=[0.0, 0.0],
        std=[1.0, 1.0],
    )
    model = Classifier(config)
    with torch.no_grad():
        model.body[0].weight.copy_(torch.eye(2))
        model.body[0].bias.zero_()
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.zero_()
    frame = pd.DataFrame(
        {"f0": [3.0, 0.0, 1.0], "f1": [1.0, 2.0, 0.5], "label": ["cat", "cat", "dog"]}
    )
    pairs = predictions(model, config, frame)
    assert pairs.to_dict("list") == {
        "actual": ["cat", "cat", "dog"],
        "predicted": ["cat", "dog", "cat"],
    }
    assert scores(pairs)["accuracy"] == pytest.approx(1 / 3, abs=1e-6)


def test_train_scratch_uses_the_shots_only() -> None:
    shots, val = _frame(5, seed=3), _frame(5, seed=4)
    template = make_config(np.zeros((2, 4)), hidden=[16]).replace(
        feature_names=FEATURES, trained_on={"domain": "base", "rows": 999}
    )
    options = FitOptions(epochs=40, batch_size=64, lr=0.01, seed=0, device="cpu")
    model, config = train_scratch(shots, val, template, "global", options)
    x = shots[FEATURES].to_numpy()
    assert config.mean == [float(x.min())] * 4
    assert config.std == [float(x.max() - x.min())] * 4
    assert config.trained_on == {"domain": "shots only"}
    assert (config.classes, config.hidden, config.feature_names) == (
        template.classes,
        template.hidden,
        template.feature_names,
    )
    assert scores(predictions(model, config, val))["accuracy"] >= 0.9
    again, _ = train_scratch(shots, val, template, "global", options)
    assert states_equal(state_copy(model), state_copy(again))


def test_train_scratch_is_seeded_by_its_options() -> None:
    """The scratch baseline starts from options.seed, whatever the global RNG state."""
    shots, val = _frame(3, seed=3), _frame(3, seed=4)
    template = make_config(np.zeros((2, 4))).replace(feature_names=FEATURES)
    options = FitOptions(epochs=2, batch_size=64, lr=0.01, seed=5, device="cpu")
    torch.manual_seed(123)
    first, _ = train_scratch(shots, val, template, "per_feature", options)
    torch.manual_seed(999)
    second, _ = train_scratch(shots, val, template, "per_feature", options)
    assert states_equal(state_copy(first), state_copy(second))
    other, _ = train_scratch(shots, val, template, "per_feature", replace(options, seed=6))
    assert not states_equal(state_copy(first), state_copy(other))


def test_classical_baseline() -> None:
    shots, test = _frame(5, seed=3, labels=("a", "b", "c")), _frame(20, seed=5, labels="abc")
    result = classical_baseline(shots, test, FEATURES)
    assert set(result) == {"accuracy", "f1_macro"}
    assert result["accuracy"] >= 0.9


def test_no_failed_gates() -> None:
    assert failed_gates(_metrics(), EvaluateParams()) == []


def test_gates_at_the_limit_pass() -> None:
    params = EvaluateParams(min_base_accuracy=0.95, min_transfer_gain=0.1)
    assert failed_gates(_metrics(base=0.95, finetuned=0.9, scratch=0.8), params) == []


def test_base_accuracy_gate() -> None:
    failures = failed_gates(_metrics(base=0.9), EvaluateParams(min_base_accuracy=0.93))
    assert failures == ["evaluate.min_base_accuracy: base.accuracy 0.9000 < 0.93"]


def test_transfer_gain_gate() -> None:
    failures = failed_gates(_metrics(finetuned=0.8, scratch=0.82), EvaluateParams())
    assert failures == [
        "evaluate.min_transfer_gain: finetuned - scratch accuracy, mean over 1 draws, "
        "-0.0200 < 0.03"
    ]


def test_transfer_gate_reads_the_mean_over_draws() -> None:
    draws = [
        {"finetuned": {"accuracy": 0.90}, "scratch": {"accuracy": 0.89}},  # one unlucky draw
        {"finetuned": {"accuracy": 0.92}, "scratch": {"accuracy": 0.80}},
    ]
    summary = summarize_draws(draws)
    assert summary == {
        "draws": 2,
        "finetuned_mean": 0.91,
        "scratch_mean": 0.845,
        "gain_mean": 0.065,
        "gain_min": 0.01,
    }
    metrics = _metrics(finetuned=0.90, scratch=0.89) | {"transfer": summary}
    assert failed_gates(metrics, EvaluateParams(min_transfer_gain=0.03)) == []
    assert len(failed_gates(metrics, EvaluateParams(min_transfer_gain=0.07))) == 1


def test_both_gates_fail() -> None:
    failures = failed_gates(_metrics(base=0.5, finetuned=0.5, scratch=0.5), EvaluateParams())
    assert [f.split(":")[0] for f in failures] == [
        "evaluate.min_base_accuracy",
        "evaluate.min_transfer_gain",
    ]


def test_render_report_passed() -> None:
    report = render_report(_metrics(), shots_per_class=5, failures=[])
    lines = report.splitlines()
    assert lines[0] == "# Evaluation"
    assert "| model | trained as | scored on | accuracy | macro F1 |" in lines
    target = "target-domain test"
    assert "| base | base model | base-domain test | 0.9500 | 0.9400 |" in lines
    assert f"| finetuned | fine-tuned on 5 shots/class | {target} | 0.9000 | 0.8900 |" in lines
    assert f"| zero_shot | base model, no adaptation | {target} | 0.0100 | 0.0200 |" in lines
    sklearn = f"| sklearn | logistic regression on the same shots | {target} |"
    assert f"{sklearn} 0.8500 | 0.8400 |" in lines
    assert "Transfer gain (finetuned - scratch, same shots): +0.1000" in lines
    assert (
        "Over 1 draws of the shots: fine-tuned 0.9000, scratch 0.8000, gain +0.1000 "
        "(worst draw +0.1000)." in lines
    )
    assert lines[-1] == "Gates: all passed."
    assert report.endswith("\n")
    assert render_report(_metrics(), 5, []) == report


def test_render_report_failed_and_missing_rows() -> None:
    failures = ["evaluate.min_transfer_gain: too small", "another"]
    report = render_report(_metrics(zero_shot=False), shots_per_class=1, failures=failures)
    lines = report.splitlines()
    assert "| zero_shot | base model, no adaptation | target-domain test | n/a | n/a |" in lines
    scratch = "| scratch | same net from scratch on the 1 shots | target-domain test |"
    assert f"{scratch} 0.8000 | 0.7900 |" in lines
    assert lines[-3:] == ["Gates failed:", "- evaluate.min_transfer_gain: too small", "- another"]


def test_compare_on_draws_scores_the_shipped_model_then_retrains() -> None:
    from conftest import make_model

    from stages.core.finetuning import few_shot_options, fine_tune, sample_shots
    from stages.core.params import parse_params
    from stages.core.training import fit

    params = parse_params(
        {
            "finetune": {"epochs": 15, "shots_per_class": 3, "seed": 7},
            "evaluate": {"draws": 3},
            "model": {"scaling": "per_feature"},
            "train": {"device": "cpu"},
        }
    )
    base_train = _frame(20, seed=1)
    base_config = make_config(base_train[FEATURES].to_numpy()).replace(feature_names=FEATURES)
    base = make_model(base_config)
    options = FitOptions(epochs=20, batch_size=16, lr=0.01, seed=0, device="cpu")
    fit(base, _tensors(base_train, base_config), _tensors(_frame(5, 2), base_config), options)
    target = {
        "train": _frame(10, seed=5, noise=4.0),
        "val": _frame(3, seed=6, noise=4.0),
        "test": _frame(30, seed=8, noise=4.0),
    }
    shots = sample_shots(target["train"], 3, 7)
    shipped, shipped_config, _ = fine_tune(base, base_config, shots, target["val"], params, 7)

    draws = compare_on_draws(base, base_config, (shipped, shipped_config), target, params)

    assert [d["seed"] for d in draws] == [7, 8, 9]
    assert draws[0]["finetuned"] == scores(predictions(shipped, shipped_config, target["test"]))
    # Each draw samples its own shots: fine-tune and scratch of draw i both train on the shots of
    # seed 7 + i, and no two draws share the same shots.
    drawn = [sample_shots(target["train"], 3, seed) for seed in (7, 8, 9)]
    as_rows = [set(map(tuple, d[FEATURES].to_numpy().round(6).tolist())) for d in drawn]
    assert as_rows[0] != as_rows[1] and as_rows[1] != as_rows[2] and as_rows[0] != as_rows[2]
    for seed, shots_i, draw in zip((7, 8, 9), drawn, draws, strict=True):
        scratch, scratch_config = train_scratch(
            shots_i, target["val"], shipped_config, "per_feature", few_shot_options(params, seed)
        )
        assert draw["scratch"] == scores(predictions(scratch, scratch_config, target["test"]))
        if seed != 7:
            tuned, tuned_config, _ = fine_tune(
                base, base_config, shots_i, target["val"], params, seed
            )
            assert draw["finetuned"] == scores(predictions(tuned, tuned_config, target["test"]))
    again = compare_on_draws(base, base_config, (shipped, shipped_config), target, params)
    assert again == draws  # seeded: the same draws and scores


def _tensors(frame: pd.DataFrame, config: ModelConfig):
    from stages.core.model import encode

    return encode(frame, config)
