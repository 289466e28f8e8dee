"""Drift: how far feature distributions move between the domains and between train and test.

Per feature, the population stability index (PSI) and the two-sample Kolmogorov-Smirnov
statistic, computed for every feature at once with NumPy. For the demo the base -> target
comparison measures the domain gap that fine-tuning closes; train vs test inside a domain
should show almost none.

For a text dataset: the PSI and KS of the texts' length in characters, and the share of the
current sample's word tokens (lower-cased) that the reference sample never has."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.core.common.numbers import rounded
from stages.core.common.schema import TEXT
from stages.core.data.text import lengths, tokens

PSI_BINS = 10


PSI_FLOOR = 1e-4  # share given to an empty bin, so that log(p / q) stays finite


SHIFTED_PSI = 0.25  # the usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted


TOP_FEATURES = 10


def ks_statistics(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The two-sample KS statistic of each column: max |ECDF_a - ECDF_b| over all values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    # One row per feature, contiguous: sorting along rows is several times faster.
    pooled = np.ascontiguousarray(np.concatenate([a, b]).T)
    order = np.argsort(pooled, axis=1)  # the order inside a tie does not matter: see below
    values = np.take_along_axis(pooled, order, axis=1)
    from_a = order < len(a)
    gap = np.abs(np.cumsum(from_a, axis=1) / len(a) - np.cumsum(~from_a, axis=1) / len(b))
    # Between tied values the ECDFs are not yet complete: read them at the last of a tie only.
    last_of_tie = np.ones_like(from_a)
    last_of_tie[:, :-1] = values[:, 1:] != values[:, :-1]
    return np.where(last_of_tie, gap, 0.0).max(axis=1)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """The PSI of each column, sum((p - q) * ln(p / q)), over ``bins`` equal-width bins that
    span both samples; a constant column scores 0."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    low = np.minimum(reference.min(axis=0), current.min(axis=0))
    high = np.maximum(reference.max(axis=0), current.max(axis=0))
    width = np.where(high > low, (high - low) / bins, 1.0)
    offsets = np.arange(reference.shape[1]) * bins

    def shares(sample: np.ndarray) -> np.ndarray:
        index = np.clip(((sample - low) / width).astype(np.int64), 0, bins - 1) + offsets
        counts = np.bincount(index.ravel(), minlength=offsets.size * bins)
        return np.maximum(counts.reshape(-1, bins) / len(sample), PSI_FLOOR)

    p, q = shares(reference), shares(current)
    return ((p - q) * np.log(p / q)).sum(axis=1)


def compare(reference: pd.DataFrame, current: pd.DataFrame, features: list[str]) -> dict:
    """PSI and KS per feature, and their summary, of ``current`` against ``reference``."""
    a, b = reference[features].to_numpy(np.float64), current[features].to_numpy(np.float64)
    psis, kss = psi(a, b), ks_statistics(a, b)
    return {
        "features": {
            name: {"psi": rounded(p), "ks": rounded(k)}
            for name, p, k in zip(features, psis, kss, strict=True)
        },
        "summary": {
            "psi_mean": rounded(psis.mean()),
            "psi_max": rounded(psis.max()),
            "ks_mean": rounded(kss.mean()),
            "ks_max": rounded(kss.max()),
            "shifted_features": int((psis > SHIFTED_PSI).sum()),
        },
    }


def drift_report(splits: dict[str, pd.DataFrame], features: list[str]) -> dict:
    """Drift between the domains (every split of each) and between train and test inside each
    domain; ``splits`` is keyed ``<role>_<part>`` as written by the split stage."""

    def domain(role: str) -> pd.DataFrame:
        return pd.concat([frame for name, frame in splits.items() if name.startswith(f"{role}_")])

    comparisons = {
        "domain_gap": compare(domain("base"), domain("target"), features),
        "base_train_vs_test": compare(splits["base_train"], splits["base_test"], features),
        "target_train_vs_test": compare(splits["target_train"], splits["target_test"], features),
    }
    return {
        "method": {"psi_bins": PSI_BINS, "psi_floor": PSI_FLOOR, "shifted_psi": SHIFTED_PSI},
        "summary": {name: result["summary"] for name, result in comparisons.items()},
        "features": {
            feature: {name: result["features"][feature] for name, result in comparisons.items()}
            for feature in features
        },
    }


TEXT_LENGTH = "text_length"  # the one "feature" of a text dataset's drift report and plot


def compare_texts(reference: pd.Series, current: pd.Series) -> dict:
    """Drift of ``current`` texts against ``reference`` ones: PSI and KS of the length in
    characters, mean lengths, and the shares of current word tokens unseen in the reference
    (of all their occurrences, and of the distinct ones)."""
    a, b = lengths(reference)[:, None], lengths(current)[:, None]
    seen = {token for text in reference for token in tokens(text)}
    counts: dict[str, int] = {}
    for text in current:
        for token in tokens(text):
            counts[token] = counts.get(token, 0) + 1
    total = sum(counts.values())
    unseen = {token: n for token, n in counts.items() if token not in seen}
    return {
        "length_psi": rounded(psi(a, b)[0]),
        "length_ks": rounded(ks_statistics(a, b)[0]),
        "length_mean_reference": rounded(a.mean()),
        "length_mean_current": rounded(b.mean()),
        "unseen_token_share": rounded(sum(unseen.values()) / total if total else 0.0),
        "unseen_vocabulary_share": rounded(len(unseen) / len(counts) if counts else 0.0),
    }


def text_drift_report(splits: dict[str, pd.DataFrame], single_domain: bool = False) -> dict:
    """A text dataset's drift: between the domains (every split of each; not for a single
    domain) and between train and test inside each domain. ``features`` holds the length's
    PSI and KS under ``text_length``, so that ``most_shifted`` draws it as for features."""

    def texts(*names: str) -> pd.Series:
        return pd.concat([splits[name][TEXT] for name in names], ignore_index=True)

    roles = ["base"] if single_domain else ["base", "target"]
    comparisons = {}
    if not single_domain:
        base = [name for name in splits if name.startswith("base_")]
        target = [name for name in splits if name.startswith("target_")]
        comparisons["domain_gap"] = compare_texts(texts(*base), texts(*target))
    for role in roles:
        comparisons[f"{role}_train_vs_test"] = compare_texts(
            texts(f"{role}_train"), texts(f"{role}_test")
        )
    return {
        "method": {
            "psi_bins": PSI_BINS,
            "psi_floor": PSI_FLOOR,
            "shifted_psi": SHIFTED_PSI,
            "length": "characters",
            "tokens": "lower-cased runs of letters, digits and underscores",
        },
        "summary": comparisons,
        "features": {
            TEXT_LENGTH: {
                name: {"psi": result["length_psi"], "ks": result["length_ks"]}
                for name, result in comparisons.items()
            }
        },
    }


def most_shifted(report: dict, comparison: str = "domain_gap", top: int = TOP_FEATURES) -> list:
    """The ``top`` features with the largest PSI in ``comparison`` (ties: larger KS, then
    name), as rows ``{"feature", "psi", "ks"}`` for the drift plot."""
    rows = [
        {"feature": feature, **scores[comparison]} for feature, scores in report["features"].items()
    ]
    rows.sort(key=lambda row: (-row["psi"], -row["ks"], row["feature"]))
    return rows[:top]
