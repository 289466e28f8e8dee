"""Classification metrics from labels and probabilities: scikit-learn's figures, calibration,
curves for DVC plots, and error bars (a bootstrap over test rows, a t-interval over draws)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from stages.core.common.numbers import rounded

CALIBRATION_BINS = 15


LEVEL = 0.95  # of every interval; the keys say so (``*_ci95_low``)


_BOOTSTRAP_CELLS = 2_000_000  # resamples x rows drawn at once: bounds memory on big test sets


def scores(pairs: pd.DataFrame) -> dict:
    """The figures every model block holds, from (``actual``, ``predicted``) pairs.

    ``accuracy``, ``precision_macro``, ``recall_macro``, ``f1_macro``, ``f1_weighted`` (scikit-
    learn's, over the labels found in either column; a label never predicted scores 0) and
    ``support``, the number of rows.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    actual, predicted = pairs["actual"].to_numpy(), pairs["predicted"].to_numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        actual, predicted, average="macro", zero_division=0
    )
    _, _, f1_weighted, _ = precision_recall_fscore_support(
        actual, predicted, average="weighted", zero_division=0
    )
    return {
        "accuracy": rounded(accuracy_score(actual, predicted)),
        "precision_macro": rounded(precision),
        "recall_macro": rounded(recall),
        "f1_macro": rounded(f1),
        "f1_weighted": rounded(f1_weighted),
        "support": len(pairs),
    }


def per_class_scores(pairs: pd.DataFrame, classes: Sequence) -> dict[str, dict]:
    """``{label: {precision, recall, f1, support}}`` for every class of the model, keyed by the
    label as text (JSON keys are text); a class with no test rows has support 0 and recall 0."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        pairs["actual"].to_numpy(),
        pairs["predicted"].to_numpy(),
        labels=list(classes),
        zero_division=0,
    )
    return {
        str(label): {
            "precision": rounded(p),
            "recall": rounded(r),
            "f1": rounded(f),
            "support": int(s),
        }
        for label, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }


def worst_class(per_class: dict[str, dict]) -> tuple[str, float]:
    """The class with the lowest recall among those with test rows (the first on a tie)."""
    scored = [(label, row["recall"]) for label, row in per_class.items() if row["support"] > 0]
    return min(scored, key=lambda item: item[1])


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> pd.DataFrame:
    """Rows grouped by confidence into ``n_bins`` equal-width bins, (low, high] (0 goes to the
    first): each bin's edges, row count, mean confidence and accuracy (NaN when empty)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "low": edges[:-1],
            "high": edges[1:],
            "count": count,
            "confidence": mean_confidence,
            "accuracy": accuracy,
        }
    )


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> float:
    """ECE: the row-weighted mean gap between accuracy and mean confidence over the bins of
    :func:`calibration_bins` (0 = the model is right as often as it is sure)."""
    bins = calibration_bins(confidence, correct, n_bins)
    filled = bins[bins["count"] > 0]
    gaps = (filled["accuracy"] - filled["confidence"]).abs()
    return float((filled["count"] * gaps).sum() / filled["count"].sum())


def confidence_and_correct(
    actual: np.ndarray, proba: np.ndarray, classes: Sequence
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top probability and whether its most probable class is the true one."""
    predicted = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    return proba.max(axis=1), predicted == np.asarray(actual, dtype=object)


def roc_auc_ovr(actual: np.ndarray, proba: np.ndarray, classes: Sequence) -> float | None:
    """One-vs-rest ROC AUC, macro-averaged over ``classes`` (two classes: the ROC AUC of the
    second); None when a class has no rows in ``actual``, where it is undefined."""
    from sklearn.metrics import roc_auc_score

    classes = list(classes)
    if not set(classes) <= set(np.asarray(actual).tolist()):
        return None
    if len(classes) == 2:
        return rounded(roc_auc_score(np.asarray(actual) == classes[1], proba[:, 1]))
    return rounded(roc_auc_score(actual, proba, multi_class="ovr", labels=classes))


def probability_scores(actual: np.ndarray, proba: np.ndarray, classes: Sequence) -> dict:
    """``roc_auc_ovr`` (one-vs-rest, macro; with two classes the plain ROC AUC; null unless every
    class has test rows), ``log_loss`` and ``ece`` (15 bins) of class probabilities (columns in
    ``classes`` order)."""
    from sklearn.metrics import log_loss

    classes = list(classes)
    confidence, correct = confidence_and_correct(actual, proba, classes)
    return {
        "roc_auc_ovr": roc_auc_ovr(actual, proba, classes),
        "log_loss": rounded(log_loss(actual, proba, labels=classes)),
        "ece": rounded(expected_calibration_error(confidence, correct)),
    }


def detailed_scores(pairs: pd.DataFrame, proba: np.ndarray, classes: Sequence) -> dict:
    """:func:`scores` plus ``per_class``, the probability scores, ``worst_class`` (its label as
    text) and ``worst_class_recall``."""
    per_class = per_class_scores(pairs, classes)
    label, recall = worst_class(per_class)
    return (
        scores(pairs)
        | {"per_class": per_class}
        | probability_scores(pairs["actual"].to_numpy(), proba, classes)
        | {"worst_class": label, "worst_class_recall": recall}
    )


def micro_curves(
    actual: np.ndarray, proba: np.ndarray, classes: Sequence
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Micro-averaged ROC (``fpr``, ``tpr``) and precision-recall (``recall``, ``precision``)
    curves: every (row, class) pair is one binary decision scored by its probability."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    from sklearn.preprocessing import label_binarize

    truth = label_binarize(actual, classes=list(classes))
    if truth.shape[1] == 1:  # two classes: label_binarize returns one column
        truth = np.hstack([1 - truth, truth])
    fpr, tpr, _ = roc_curve(truth.ravel(), proba.ravel())
    precision, recall, _ = precision_recall_curve(
        truth.ravel(), proba.ravel(), drop_intermediate=True
    )
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr})
    pr = pd.DataFrame({"recall": recall, "precision": precision}).iloc[::-1]
    return roc, pr.reset_index(drop=True)


def resampled_scores(
    weights: np.ndarray, actual: np.ndarray, predicted: np.ndarray
) -> dict[str, np.ndarray]:
    """``accuracy``, ``recall_macro`` and ``f1_macro`` of each resample of the rows, where
    ``weights[b, i]`` is how often resample ``b`` drew row ``i``; the same figures scikit-learn
    gives on the resampled rows (macro over the labels found in the resample)."""
    labels, codes = np.unique(np.concatenate([actual, predicted]), return_inverse=True)
    actual_code, predicted_code = codes[: len(actual)], codes[len(actual) :]
    one_hot = np.eye(len(labels))
    is_actual, is_predicted = one_hot[actual_code], one_hot[predicted_code]
    hits = is_actual * (actual_code == predicted_code)[:, None]
    weights = np.asarray(weights, dtype=np.float64)
    n_actual, n_predicted, n_hits = weights @ is_actual, weights @ is_predicted, weights @ hits
    present = (n_actual + n_predicted) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_actual > 0, n_hits / n_actual, 0.0)
        f1 = np.where(present, 2 * n_hits / (n_actual + n_predicted), 0.0)
    n_labels = present.sum(axis=1)
    return {
        "accuracy": n_hits.sum(axis=1) / weights.sum(axis=1),
        "recall_macro": (recall * present).sum(axis=1) / n_labels,
        "f1_macro": (f1 * present).sum(axis=1) / n_labels,
    }


def bootstrap_weights(rng: np.random.Generator, n_rows: int, resamples: int) -> np.ndarray:
    """``resamples`` bootstrap resamples of ``n_rows`` rows (drawn with replacement), as how
    often each resample draws each row: shape (resamples, n_rows)."""
    drawn = rng.integers(0, n_rows, size=(resamples, n_rows))
    offsets = np.arange(resamples)[:, None] * n_rows
    flat = np.bincount((drawn + offsets).ravel(), minlength=resamples * n_rows)
    return flat.reshape(resamples, n_rows)


def bootstrap_intervals(
    pairs: pd.DataFrame, resamples: int, seed: int, level: float = LEVEL
) -> dict[str, float]:
    """Percentile intervals of accuracy, recall_macro and f1_macro over ``resamples`` seeded
    bootstrap resamples of the rows: ``<figure>_ci95_low`` and ``<figure>_ci95_high``.

    Models scored on the same rows with the same seed see the same resamples (paired).
    """
    actual, predicted = pairs["actual"].to_numpy(), pairs["predicted"].to_numpy()
    n_rows = len(actual)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // n_rows)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, resamples, chunk):
        weights = bootstrap_weights(rng, n_rows, min(chunk, resamples - start))
        for name, values in resampled_scores(weights, actual, predicted).items():
            parts.setdefault(name, []).append(values)
    tail = (1 - level) / 2
    intervals = {}
    for name, chunks in parts.items():
        low, high = np.quantile(np.concatenate(chunks), [tail, 1 - tail])
        intervals[f"{name}_ci95_low"] = rounded(low)
        intervals[f"{name}_ci95_high"] = rounded(high)
    return intervals


def mean_interval(
    values: Sequence[float], level: float = LEVEL
) -> tuple[float | None, float | None]:
    """Student-t interval for the mean of ``values``; (None, None) with fewer than two."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None, None
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return rounded(mean - half), rounded(mean + half)
