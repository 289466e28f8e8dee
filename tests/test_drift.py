"""Drift: PSI and KS per feature, vectorised; the report the split stage writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_raw_frame
from scipy import stats

from stages.core.common.data_params import SplitParams
from stages.core.data.drift import (
    PSI_FLOOR,
    SHIFTED_PSI,
    compare,
    drift_report,
    ks_statistics,
    most_shifted,
    psi,
)
from stages.core.data.splitting import split_domains


@pytest.mark.parametrize("integers", [False, True])
def test_ks_matches_scipy_column_by_column(integers: bool) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, size=(300, 6))
    b = rng.normal(0.3, 1.2, size=(200, 6))
    if integers:  # many ties, as in pixel data
        a, b = np.round(a * 3), np.round(b * 3)
    ours = ks_statistics(a, b)
    reference = [stats.ks_2samp(a[:, j], b[:, j]).statistic for j in range(6)]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)


def test_psi_by_hand() -> None:
    # Two bins over [0, 1]: shares (1/2, 1/2) against (1/4, 3/4).
    reference = np.array([[0.0], [0.0], [1.0], [1.0]])
    current = np.array([[0.0], [1.0], [1.0], [1.0]])
    expected = (0.5 - 0.25) * np.log(0.5 / 0.25) + (0.5 - 0.75) * np.log(0.5 / 0.75)
    assert psi(reference, current, bins=2)[0] == pytest.approx(expected)
    assert expected == pytest.approx(0.274653, abs=1e-6)


def test_psi_of_disjoint_samples_is_bounded_by_the_floor() -> None:
    low, high = np.zeros((50, 1)), np.full((50, 1), 16.0)
    # All mass in the first bin against all in the last: 2 * (1 - floor) * ln(1 / floor).
    expected = 2 * (1 - PSI_FLOOR) * np.log(1 / PSI_FLOOR)
    assert psi(low, high)[0] == pytest.approx(expected)


def test_identical_and_constant_columns_score_zero() -> None:
    rng = np.random.default_rng(1)
    a = np.column_stack([rng.normal(size=100), np.full(100, 7.0)])
    assert psi(a, a).tolist() == [0.0, 0.0]
    assert ks_statistics(a, a).tolist() == [0.0, 0.0]
    b = np.column_stack([rng.normal(size=80), np.full(80, 7.0)])
    assert psi(a, b)[1] == 0.0 and ks_statistics(a, b)[1] == 0.0


def test_compare_summary() -> None:
    rng = np.random.default_rng(2)
    reference = pd.DataFrame({"same": rng.normal(size=400), "moved": rng.normal(size=400)})
    current = pd.DataFrame({"same": rng.normal(size=400), "moved": rng.normal(3, 1, size=400)})
    result = compare(reference, current, ["same", "moved"])
    assert result["features"]["moved"]["psi"] > SHIFTED_PSI > result["features"]["same"]["psi"]
    assert result["features"]["moved"]["ks"] > 0.8
    assert result["summary"]["shifted_features"] == 1
    assert result["summary"]["psi_max"] == result["features"]["moved"]["psi"]


def test_drift_report_on_an_inverted_domain() -> None:
    frame = make_raw_frame(rows_per_pair=100, seed=5)
    features = ["f0", "f1", "f2", "f3"]
    frame[features] = frame[features] / 4  # dark: pixels in [0, 4]
    target = frame["domain"] == "target"
    frame.loc[target, features] = 16.0 - frame.loc[target, features]  # light on dark
    splits = split_domains(frame, SplitParams(), {"base": "base", "target": "target"})
    report = drift_report(splits, features)
    assert list(report["summary"]) == ["domain_gap", "base_train_vs_test", "target_train_vs_test"]
    assert list(report["features"]) == features
    gap = report["summary"]["domain_gap"]
    inside = report["summary"]["base_train_vs_test"]
    assert gap["psi_mean"] > 10 * inside["psi_mean"]
    assert gap["ks_mean"] > 3 * inside["ks_mean"]
    top = most_shifted(report, top=2)
    assert [row["psi"] for row in top] == sorted(
        (scores["domain_gap"]["psi"] for scores in report["features"].values()), reverse=True
    )[:2]
    assert set(top[0]) == {"feature", "psi", "ks"}
