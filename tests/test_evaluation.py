"""Evaluation: scored predictions, the baselines and shot draws, the metrics blocks, the gates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_blobs, make_config, state_copy, states_equal

from stages.core.common.params import EvaluateParams
from stages.core.engine.inference import predict
from stages.core.engine.training import FitOptions
from stages.core.evaluation.baselines import (
    Draw,
    classical_baseline,
    compare_on_draws,
    summarize_draws,
    train_scratch,
)
from stages.core.evaluation.gates import failed_gates, gates
from stages.core.evaluation.metrics import scores
from stages.core.evaluation.results import evaluation_metrics
from stages.core.evaluation.scoring import Scored, predictions, score_model
from stages.core.modeling.model import Classifier, ModelConfig
from stages.core.tracking.model_evaluation import log_classifier_evaluation

FEATURES = ["f0", "f1", "f2", "f3"]
COMMON = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "support"}
INTERVALS = {
    f"{name}_ci95_{end}"
    for name in ("accuracy", "recall_macro", "f1_macro")
    for end in ("low", "high")
}
DETAILED = {"per_class", "roc_auc_ovr", "log_loss", "ece", "worst_class", "worst_class_recall"}


def _frame(n_per_class: int, seed: int, labels=(0, 1, 2), noise: float = 0.0) -> pd.DataFrame:
    x, y = make_blobs(n_per_class, seed=seed)
    x = x.numpy().astype(np.float64)
    # Extra noise makes the classes overlap, so that scores depend on which rows trained.
    x += np.random.default_rng(seed).normal(0, noise, size=x.shape) if noise else 0
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["label"] = [labels[i] for i in y.tolist()]
    return frame


def _metrics(base=0.95, finetuned=0.9, scratch=0.8, worst=("4", 0.7)) -> dict:
    """Metrics as the gates read them (one draw)."""
    return {
        "base": {"accuracy": base},
        "finetuned": {
            "accuracy": finetuned,
            "worst_class": worst[0],
            "worst_class_recall": worst[1],
        },
        "scratch": {"accuracy": scratch},
        "transfer_gain": round(finetuned - scratch, 6),
        "transfer": summarize_draws([finetuned], [scratch]),
    }


def _hand_wired() -> tuple[Classifier, ModelConfig]:
    """class = the larger of two inputs (logits = inputs, after a ReLU)."""
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
    return model, config


def test_score_model_gives_labels_and_probabilities() -> None:
    model, config = _hand_wired()
    frame = pd.DataFrame(
        {"f0": [3.0, 0.0, 1.0], "f1": [1.0, 2.0, 1.0 + np.log(3)], "label": ["cat", "cat", "dog"]}
    )
    scored = score_model(model, config, frame)
    assert scored.pairs.to_dict("list") == {
        "actual": ["cat", "cat", "dog"],
        "predicted": ["cat", "dog", "dog"],
    }
    assert scored.classes == ["cat", "dog"]
    # softmax of logits (3, 1), (0, 2), (1, 1 + ln 3): e^2 / (e^2 + 1), ..., 3 / (1 + 3)
    e2 = np.exp(2.0)
    expected = [[e2 / (e2 + 1), 1 / (e2 + 1)], [1 / (1 + e2), e2 / (1 + e2)], [0.25, 0.75]]
    np.testing.assert_allclose(scored.proba, expected, rtol=1e-6)
    assert predictions(model, config, frame).equals(scored.pairs)


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
    pairs = classical_baseline(shots, test, FEATURES)
    assert pairs["actual"].tolist() == test["label"].tolist()
    assert set(pairs["predicted"]) <= {"a", "b", "c"}
    assert scores(pairs)["accuracy"] >= 0.9


def test_no_failed_gates() -> None:
    assert failed_gates(_metrics(), EvaluateParams()) == []


def test_gates_at_the_limit_pass() -> None:
    params = EvaluateParams(min_base_accuracy=0.95, min_transfer_gain=0.1, min_class_recall=0.7)
    assert failed_gates(_metrics(base=0.95, finetuned=0.9, scratch=0.8), params) == []


def test_base_accuracy_gate() -> None:
    failures = failed_gates(_metrics(base=0.9), EvaluateParams(min_base_accuracy=0.93))
    assert failures == ["evaluate.min_base_accuracy: base.accuracy 0.9000 < 0.93"]


def test_transfer_gain_gate() -> None:
    failures = failed_gates(_metrics(finetuned=0.8, scratch=0.82), EvaluateParams())
    assert failures == [
        "evaluate.min_transfer_gain: transfer.gain_mean (finetuned - scratch accuracy, mean over "
        "1 draws) -0.0200 < 0.03"
    ]


def test_class_recall_gate_is_off_by_default() -> None:
    metrics = _metrics(worst=("7", 0.1))
    assert failed_gates(metrics, EvaluateParams()) == []
    off = [g for g in gates(metrics, EvaluateParams()) if g.key == "min_class_recall"]
    assert off[0].threshold is None and off[0].passed


def test_class_recall_gate() -> None:
    failures = failed_gates(_metrics(worst=("7", 0.6)), EvaluateParams(min_class_recall=0.75))
    assert failures == [
        "evaluate.min_class_recall: finetuned.worst_class_recall (class 7) 0.6000 < 0.75"
    ]


def test_transfer_gate_reads_the_mean_over_draws() -> None:
    # one unlucky draw (+0.01), one good one (+0.12)
    summary = summarize_draws([0.90, 0.92], [0.89, 0.80])
    # t(0.975, df 1) = 12.706205: mean 0.065 -+ 12.706205 * sd 0.0777817 / sqrt(2)
    half = 12.706205 * 0.0777817 / np.sqrt(2)
    assert summary["gain_ci95_low"] == pytest.approx(0.065 - half, abs=1e-5)
    assert summary["gain_ci95_high"] == pytest.approx(0.065 + half, abs=1e-5)
    assert {k: v for k, v in summary.items() if "ci95" not in k} == {
        "draws": 2,
        "finetuned_mean": 0.91,
        "scratch_mean": 0.845,
        "gain_mean": 0.065,
        "gain_min": 0.01,
    }
    metrics = _metrics(finetuned=0.90, scratch=0.89) | {"transfer": summary}
    assert failed_gates(metrics, EvaluateParams(min_transfer_gain=0.03)) == []
    assert len(failed_gates(metrics, EvaluateParams(min_transfer_gain=0.07))) == 1


def test_a_single_draw_has_no_interval() -> None:
    summary = summarize_draws([0.9], [0.8])
    assert summary["gain_ci95_low"] is None and summary["gain_ci95_high"] is None


def test_every_failed_gate_is_one_line() -> None:
    params = EvaluateParams(min_class_recall=0.9)
    failures = failed_gates(_metrics(base=0.5, finetuned=0.5, scratch=0.5), params)
    assert [f.split(":")[0] for f in failures] == [
        "evaluate.min_base_accuracy",
        "evaluate.min_transfer_gain",
        "evaluate.min_class_recall",
    ]
    assert all("\n" not in f for f in failures)


def _scored(pairs: pd.DataFrame, classes: list) -> Scored:
    proba = np.full((len(pairs), len(classes)), 0.1)
    proba[np.arange(len(pairs)), [classes.index(p) for p in pairs["predicted"]]] = 0.8
    return Scored(pairs=pairs, proba=proba / proba.sum(axis=1, keepdims=True), classes=classes)


def test_evaluation_metrics_blocks() -> None:
    rng = np.random.default_rng(0)
    actual = np.repeat([0, 1, 2], 20)

    def noisy(accuracy: float) -> pd.DataFrame:
        predicted = np.where(rng.random(60) < accuracy, actual, (actual + 1) % 3)
        return pd.DataFrame({"actual": actual, "predicted": predicted})

    tuned, scratch, sklearn = noisy(0.9), noisy(0.7), noisy(0.8)
    draws = [Draw(42, tuned, scratch, sklearn), Draw(43, noisy(0.9), noisy(0.8), noisy(0.6))]
    params = EvaluateParams(bootstrap_resamples=300, bootstrap_seed=1)
    metrics = evaluation_metrics(
        base=_scored(noisy(0.95), [0, 1, 2]),
        finetuned=_scored(tuned, [0, 1, 2]),
        draws=draws,
        zero_shot=None,
        params=params,
    )
    assert set(metrics) == {
        "base", "finetuned", "scratch", "sklearn", "transfer_gain", "transfer", "versus_sklearn",
    }  # fmt: skip
    for key in ("base", "finetuned"):
        assert set(metrics[key]) == COMMON | INTERVALS | DETAILED
    for key in ("scratch", "sklearn"):
        assert set(metrics[key]) == COMMON | INTERVALS

    def accuracy(pairs: pd.DataFrame) -> float:  # by hand, not with the metrics module
        return float((pairs["actual"] == pairs["predicted"]).mean())

    assert metrics["scratch"]["accuracy"] == pytest.approx(accuracy(scratch), abs=1e-6)
    assert metrics["finetuned"]["accuracy"] == pytest.approx(accuracy(tuned), abs=1e-6)
    gain = accuracy(tuned) - accuracy(scratch)
    assert metrics["transfer_gain"] == pytest.approx(gain, abs=1e-6)
    assert metrics["transfer"]["draws"] == 2
    # sklearn's block is the shipped draw's; versus_sklearn averages the gain over both draws
    assert metrics["sklearn"]["accuracy"] == pytest.approx(accuracy(sklearn), abs=1e-6)
    versus = metrics["versus_sklearn"]
    tuned_two = [accuracy(tuned), accuracy(draws[1].finetuned)]
    sklearn_two = [accuracy(sklearn), accuracy(draws[1].sklearn)]
    assert versus["draws"] == 2
    assert versus["finetuned_mean"] == pytest.approx(sum(tuned_two) / 2, abs=1e-6)
    assert versus["sklearn_mean"] == pytest.approx(sum(sklearn_two) / 2, abs=1e-6)
    gains = [t - k for t, k in zip(tuned_two, sklearn_two, strict=True)]
    assert versus["gain_min"] == pytest.approx(min(gains), abs=1e-6)
    assert versus["gain_ci95_low"] < versus["gain_mean"] < versus["gain_ci95_high"]
    block = metrics["finetuned"]
    assert block["accuracy_ci95_low"] < block["accuracy"] < block["accuracy_ci95_high"]
    # Same seed, same rows: the same resamples, so a model's interval is reproducible
    again = evaluation_metrics(
        _scored(noisy(0.95), [0, 1, 2]), _scored(tuned, [0, 1, 2]), draws, None, params
    )
    assert again["finetuned"] == metrics["finetuned"]
    assert again["scratch"] == metrics["scratch"]


def _shots_by_hand(frame: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """``per_class`` rows of each class, sampled with pandas directly (sorted by class)."""
    return (
        frame.groupby("label", group_keys=False, sort=True)
        .sample(n=per_class, random_state=seed)
        .reset_index(drop=True)
    )


def _adam_by_hand(model: torch.nn.Module, shots: pd.DataFrame, epochs: int, lr: float, seed: int):
    """A plain loop: Adam on the parameters that require grad, mean cross-entropy, every shot in
    one batch (64 rows > the shots) in an order drawn from a generator seeded with ``seed``."""
    x = torch.tensor(shots[FEATURES].to_numpy(np.float32))
    y = torch.tensor(shots["label"].to_numpy(np.int64))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[order]), y[order])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def _predicted_by_hand(model: torch.nn.Module, test: pd.DataFrame) -> list:
    with torch.no_grad():
        model.eval()
        logits = model(torch.tensor(test[FEATURES].to_numpy(np.float32)))
    return logits.argmax(dim=1).tolist()  # the classes are 0, 1, 2: index = label


def test_compare_on_draws_scores_the_shipped_model_then_retrains() -> None:
    import copy

    from conftest import make_model

    from stages.core.common.params import parse_params
    from stages.core.engine.training import fit
    from stages.core.modeling.finetuning import fine_tune, sample_shots

    epochs, lr = 15, 0.01
    params = parse_params(
        {
            "finetune": {"epochs": epochs, "lr": lr, "shots_per_class": 3, "seed": 7},
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

    assert [d.seed for d in draws] == [7, 8, 9]
    actual = target["test"]["label"].tolist()
    assert draws[0].finetuned["predicted"].tolist() == _predicted_by_hand(shipped, target["test"])
    # Each draw samples its own shots: fine-tune and scratch of draw i both train on the shots of
    # seed 7 + i, as the recipe run by hand (pandas' sample, a plain Adam loop) gives them, and
    # no two draws share the same shots.
    drawn = [_shots_by_hand(target["train"], 3, seed) for seed in (7, 8, 9)]
    as_rows = [set(map(tuple, d[FEATURES].to_numpy().round(6).tolist())) for d in drawn]
    assert as_rows[0] != as_rows[1] and as_rows[1] != as_rows[2] and as_rows[0] != as_rows[2]
    for seed, shots_i, draw in zip((7, 8, 9), drawn, draws, strict=True):
        # scratch: the base's architecture from random weights seeded with the draw's seed,
        # standardised on the draw's shots only
        x = shots_i[FEATURES].to_numpy()
        mean, std = x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32)
        scratch_config = replace(base_config, mean=mean.tolist(), std=std.tolist())
        torch.manual_seed(seed)
        scratch = _adam_by_hand(Classifier(scratch_config), shots_i, epochs, lr, seed)
        assert draw.scratch["predicted"].tolist() == _predicted_by_hand(scratch, target["test"])
        if seed != 7:
            # head strategy: the base's body frozen, a new head seeded with the draw's seed
            tuned = copy.deepcopy(base)
            torch.manual_seed(seed)
            tuned.head = torch.nn.Linear(tuned.head.in_features, 3)
            tuned.body.requires_grad_(False)
            _adam_by_hand(tuned, shots_i, epochs, lr, seed)
            assert draw.finetuned["predicted"].tolist() == _predicted_by_hand(tuned, target["test"])
        # sklearn: a scaled logistic regression fitted on the draw's shots, by hand
        from sklearn.linear_model import LogisticRegression

        regression = LogisticRegression(max_iter=2000).fit(
            (x - x.mean(0)) / x.std(0), shots_i["label"]
        )
        test_x = target["test"][FEATURES].to_numpy()
        by_hand = regression.predict((test_x - x.mean(0)) / x.std(0))
        assert draw.sklearn["predicted"].tolist() == by_hand.tolist()
        for pairs in (draw.finetuned, draw.scratch, draw.sklearn):
            assert pairs["actual"].tolist() == actual
    # every draw refits sklearn on its own shots
    assert not draws[1].sklearn.equals(draws[0].sklearn) or not draws[2].sklearn.equals(
        draws[0].sklearn
    )
    # the retrained draws differ from the shipped one: they did retrain
    assert not draws[1].finetuned.equals(draws[0].finetuned)
    again = compare_on_draws(base, base_config, (shipped, shipped_config), target, params)
    for first, second in zip(draws, again, strict=True):  # seeded: the same predictions
        assert first.finetuned.equals(second.finetuned) and first.scratch.equals(second.scratch)
        assert first.sklearn.equals(second.sklearn)


def _tensors(frame: pd.DataFrame, config: ModelConfig):
    from stages.core.modeling.model import encode

    return encode(frame, config)


def test_mlflow_classifier_evaluation_of_two_text_classes(mlflow_client) -> None:
    """MLflow's evaluation, with our ROC AUC and log loss, of a model with text labels."""
    from conftest import TEST_EXPERIMENT

    from stages.core.evaluation.metrics import probability_scores
    from stages.core.tracking.runs import stage_run

    model, config = _hand_wired()
    rng = np.random.default_rng(0)
    test = pd.DataFrame({"f0": rng.normal(1, 1, 40), "f1": rng.normal(1, 1, 40)})
    test["label"] = np.where(test["f0"] + rng.normal(0, 0.5, 40) > test["f1"], "cat", "dog")
    scored = score_model(model, config, test)
    ours = scores(scored.pairs) | probability_scores(
        test["label"].to_numpy(), scored.proba, config.classes
    )
    with stage_run("evaluate", TEST_EXPERIMENT, {}) as run:
        found = run.call(
            _evaluate_in_run,
            label_predictor(model, config),
            test,
            config.feature_names,
            scored.proba,
            config.classes,
        )
    # Expected values from scikit-learn, not from our metrics module
    from sklearn.metrics import log_loss, roc_auc_score

    truth = test["label"].to_numpy()
    accuracy = float((scored.pairs["predicted"].to_numpy() == truth).mean())
    roc_auc = roc_auc_score(truth == "dog", scored.proba[:, 1])
    assert 0.6 < accuracy < 1  # informative, not perfect
    assert ours["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert found["accuracy_score"] == pytest.approx(accuracy, abs=1e-6)
    assert 0.6 < roc_auc < 1
    assert ours["roc_auc_ovr"] == pytest.approx(roc_auc, abs=1e-6)
    assert found["roc_auc"] == pytest.approx(roc_auc, abs=1e-6)
    expected_loss = log_loss(truth, scored.proba, labels=config.classes)
    assert found["log_loss"] == pytest.approx(expected_loss, abs=1e-6)
    logged = mlflow_client.get_run(run.id)
    assert logged.data.metrics["roc_auc"] == pytest.approx(roc_auc, abs=1e-6)
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.id)}
    assert "confusion_matrix.png" in artifacts


def label_predictor(model: Classifier, config: ModelConfig):
    """``model`` as MLflow's callable form: a frame of raw feature columns -> class labels."""

    def predict_labels(frame: pd.DataFrame) -> np.ndarray:
        x = torch.tensor(frame[config.feature_names].to_numpy(np.float32))
        return np.asarray(config.classes)[predict(model, x).numpy()]

    return predict_labels


def _evaluate_in_run(recorder, *args):
    """What stages.core.evaluation.scoring.evaluate_registered does, with a callable model."""
    recorder.activate()
    return log_classifier_evaluation(*args)
