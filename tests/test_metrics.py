"""Metrics: scikit-learn's figures, per-class scores, calibration, curves and error bars."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import classification_report, recall_score, roc_auc_score

from stages.core.evaluation.metrics import (
    bootstrap_intervals,
    bootstrap_weights,
    calibration_bins,
    detailed_scores,
    expected_calibration_error,
    mean_interval,
    micro_curves,
    per_class_scores,
    probability_scores,
    resampled_scores,
    roc_auc_ovr,
    scores,
    worst_class,
)


def _pairs(actual, predicted) -> pd.DataFrame:
    return pd.DataFrame({"actual": actual, "predicted": predicted})


def _noisy_pairs(n: int, accuracy: float, seed: int, n_classes: int = 4) -> pd.DataFrame:
    """Labels of ``n`` rows, each predicted right with probability ``accuracy``."""
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, n_classes, n)
    wrong = (actual + rng.integers(1, n_classes, n)) % n_classes
    predicted = np.where(rng.random(n) < accuracy, actual, wrong)
    return _pairs(actual, predicted)


def test_scores_by_hand() -> None:
    pairs = _pairs([0, 0, 1, 1], [0, 1, 1, 1])
    # class 0: P=1, R=0.5, F1=2/3; class 1: P=2/3, R=1, F1=0.8; two rows each
    assert scores(pairs) == {
        "accuracy": 0.75,
        "precision_macro": round((1 + 2 / 3) / 2, 6),
        "recall_macro": 0.75,
        "f1_macro": round((2 / 3 + 0.8) / 2, 6),
        "f1_weighted": round((2 / 3 + 0.8) / 2, 6),
        "support": 4,
    }


def test_scores_match_classification_report() -> None:
    # Class "d" is never predicted, "e" is predicted but never true; classes are unbalanced.
    actual = list("aaaaabbbccccddde")[:-1] + ["a"]
    predicted = list("aaabbbbacccaaeee")
    pairs = _pairs(actual, predicted)
    report = classification_report(actual, predicted, output_dict=True, zero_division=0)
    ours = scores(pairs)
    assert ours["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)
    for key, average in (("precision_macro", "precision"), ("recall_macro", "recall")):
        assert ours[key] == pytest.approx(report["macro avg"][average], abs=1e-6)
    assert ours["f1_macro"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-6)
    assert ours["f1_weighted"] == pytest.approx(report["weighted avg"]["f1-score"], abs=1e-6)
    assert ours["support"] == report["macro avg"]["support"] == 16
    per_class = per_class_scores(pairs, ["a", "b", "c", "d", "e"])
    for label, row in per_class.items():
        expected = report[label]
        assert row["precision"] == pytest.approx(expected["precision"], abs=1e-6)
        assert row["recall"] == pytest.approx(expected["recall"], abs=1e-6)
        assert row["f1"] == pytest.approx(expected["f1-score"], abs=1e-6)
        assert row["support"] == expected["support"]
    assert per_class["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}


def test_per_class_keys_are_text_and_cover_every_model_class() -> None:
    per_class = per_class_scores(_pairs([0, 1, 1], [0, 1, 0]), [0, 1, 2])
    assert list(per_class) == ["0", "1", "2"]
    assert per_class["1"] == {"precision": 1.0, "recall": 0.5, "f1": round(2 / 3, 6), "support": 2}
    assert per_class["2"]["support"] == 0


def test_worst_class_skips_classes_without_rows_and_takes_the_first_tie() -> None:
    per_class = {
        "0": {"recall": 0.5, "support": 2},
        "1": {"recall": 0.0, "support": 0},  # no test rows: not a weak class
        "2": {"recall": 0.5, "support": 4},
        "3": {"recall": 0.9, "support": 4},
    }
    assert worst_class(per_class) == ("0", 0.5)


def test_calibration_bins_by_hand() -> None:
    confidence = np.array([0.0, 0.05, 0.5, 0.99, 1.0])
    bins = calibration_bins(confidence, np.array([1, 0, 1, 1, 0]), n_bins=4)
    # bins (low, high]: [0, 0.25] (0 goes to the first), (0.25, 0.5], (0.5, 0.75], (0.75, 1]
    assert bins["count"].tolist() == [2, 1, 0, 2]
    assert bins["low"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert bins["confidence"].tolist()[:2] == [0.025, 0.5]
    assert bins["accuracy"].tolist()[0] == 0.5 and bins["accuracy"].tolist()[3] == 0.5
    assert math.isnan(bins["accuracy"].iloc[2])


def test_ece_by_hand() -> None:
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.25])
    correct = np.array([True, False, True, True, False])
    # 15 bins of width 1/15: 0.95 in (0.933, 1], 0.55 in (0.533, 0.6], 0.25 in (0.2, 0.267].
    # |0.5 - 0.95| * 2/5 + |1 - 0.55| * 2/5 + |0 - 0.25| * 1/5 = 0.18 + 0.18 + 0.05
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.41)
    # Right as often as it is sure: 4 of 5 right at 0.8 confidence.
    assert expected_calibration_error(np.full(5, 0.8), np.array([1, 1, 1, 1, 0])) == 0


def test_probability_scores_by_hand() -> None:
    classes = ["a", "b", "c"]
    proba = np.array(
        [
            [0.5, 0.25, 0.25],
            [0.25, 0.5, 0.25],
            [0.25, 0.25, 0.5],
            [0.5, 0.5, 0.0],  # true class "b" tied first: argmax picks "a", so wrong
        ]
    )
    found = probability_scores(np.array(["a", "b", "c", "b"]), proba, classes)
    assert found["log_loss"] == pytest.approx(-math.log(0.5), abs=1e-6)
    # Each class's true rows outrank its other rows, except ties at 0.5 / 0.25 for "a".
    assert found["roc_auc_ovr"] == pytest.approx(
        roc_auc_score(["a", "b", "c", "b"], proba, multi_class="ovr", labels=classes), abs=1e-6
    )
    # Confidence 0.5 on every row, 3 of 4 right: one bin, |0.75 - 0.5| = 0.25.
    assert found["ece"] == 0.25


def test_roc_auc_of_two_classes_by_hand() -> None:
    proba_b = np.array([0.1, 0.9, 0.6, 0.4])
    proba = np.column_stack([1 - proba_b, proba_b])
    # "b" rows score 0.9 and 0.4, "a" rows 0.1 and 0.6: 3 of the 4 (b, a) pairs rank right
    assert roc_auc_ovr(np.array(["a", "b", "a", "b"]), proba, ["a", "b"]) == 0.75


def test_roc_auc_is_null_when_a_class_has_no_test_rows() -> None:
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    found = probability_scores(np.array([0, 1]), proba, [0, 1, 2])
    assert found["roc_auc_ovr"] is None
    assert found["log_loss"] == pytest.approx(-math.log(0.8), abs=1e-6)


def test_detailed_scores_name_the_worst_class() -> None:
    pairs = _pairs([0, 0, 1, 1, 2, 2], [0, 0, 1, 0, 2, 2])
    proba = np.eye(3)[[0, 0, 1, 0, 2, 2]] * 0.7 + 0.1
    block = detailed_scores(pairs, proba, [0, 1, 2])
    assert block["worst_class"] == "1" and block["worst_class_recall"] == 0.5
    assert set(block) == {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "f1_weighted",
        "support",
        "per_class",
        "roc_auc_ovr",
        "log_loss",
        "ece",
        "worst_class",
        "worst_class_recall",
    }


def test_micro_curves() -> None:
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 3, 60)
    proba = rng.dirichlet([1, 1, 1], 60)
    proba[np.arange(60), actual] += rng.random(60)  # informative, not perfect
    proba /= proba.sum(axis=1, keepdims=True)
    roc, pr = micro_curves(actual, proba, [0, 1, 2])
    assert list(roc.columns) == ["fpr", "tpr"] and list(pr.columns) == ["recall", "precision"]
    assert roc.iloc[0].tolist() == [0.0, 0.0] and roc.iloc[-1].tolist() == [1.0, 1.0]
    assert roc["fpr"].is_monotonic_increasing and pr["recall"].is_monotonic_increasing
    # The area under our curve is scikit-learn's micro-averaged ROC AUC.
    truth = np.eye(3)[actual]
    area = np.trapezoid(roc["tpr"], roc["fpr"])
    assert area == pytest.approx(roc_auc_score(truth, proba, average="micro"), abs=1e-9)
    assert pr["recall"].iloc[-1] == 1.0 and pr["precision"].iloc[-1] == pytest.approx(1 / 3)


def test_resampled_scores_are_scikit_learns_on_the_resampled_rows() -> None:
    pairs = _noisy_pairs(40, accuracy=0.7, seed=1)
    actual, predicted = pairs["actual"].to_numpy(), pairs["predicted"].to_numpy()
    weights = bootstrap_weights(np.random.default_rng(2), len(pairs), 6)
    assert (weights.sum(axis=1) == len(pairs)).all()
    found = resampled_scores(weights, actual, predicted)
    for b, row in enumerate(weights):
        rows = np.repeat(np.arange(len(pairs)), row)
        resample = scores(_pairs(actual[rows], predicted[rows]))
        assert found["accuracy"][b] == pytest.approx(resample["accuracy"], abs=1e-6)
        assert found["recall_macro"][b] == pytest.approx(resample["recall_macro"], abs=1e-6)
        assert found["f1_macro"][b] == pytest.approx(resample["f1_macro"], abs=1e-6)
        expected = recall_score(actual[rows], predicted[rows], average="macro", zero_division=0)
        assert found["recall_macro"][b] == pytest.approx(expected)


def test_bootstrap_is_seeded() -> None:
    pairs = _noisy_pairs(180, accuracy=0.9, seed=3)
    first = bootstrap_intervals(pairs, resamples=500, seed=7)
    assert bootstrap_intervals(pairs, resamples=500, seed=7) == first
    assert bootstrap_intervals(pairs, resamples=500, seed=8) != first
    assert set(first) == {
        f"{name}_ci95_{end}"
        for name in ("accuracy", "recall_macro", "f1_macro")
        for end in ("low", "high")
    }


def test_bootstrap_interval_of_an_accuracy_by_hand() -> None:
    """A resampled accuracy is Binomial(n, p) / n: 95% of it within 1.96 sqrt(p (1 - p) / n)."""
    pairs = _noisy_pairs(400, accuracy=0.9, seed=4)
    accuracy = scores(pairs)["accuracy"]
    found = bootstrap_intervals(pairs, resamples=4000, seed=0)
    half_width = 1.96 * math.sqrt(accuracy * (1 - accuracy) / 400)  # about 0.03
    assert found["accuracy_ci95_low"] == pytest.approx(accuracy - half_width, abs=0.005)
    assert found["accuracy_ci95_high"] == pytest.approx(accuracy + half_width, abs=0.005)


def test_bootstrap_narrows_with_more_rows() -> None:
    def width(n: int) -> float:
        found = bootstrap_intervals(_noisy_pairs(n, accuracy=0.8, seed=5), 1000, seed=0)
        return found["accuracy_ci95_high"] - found["accuracy_ci95_low"]

    # 100x the rows, a tenth of the width
    assert width(100) / width(10_000) == pytest.approx(10, rel=0.25)


def test_bootstrap_of_a_perfect_model_is_a_point() -> None:
    found = bootstrap_intervals(_pairs([0, 1, 2] * 10, [0, 1, 2] * 10), 200, seed=0)
    assert set(found.values()) == {1.0}


def test_mean_interval_by_hand() -> None:
    # mean 2, sample sd 1, n 3: 2 -+ t(0.975, df 2) / sqrt(3), t = 4.302653 from a t table
    low, high = mean_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-6)
    assert high == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-6)
    assert mean_interval([0.05, 0.05]) == (0.05, 0.05)
    assert mean_interval([0.05]) == (None, None)
