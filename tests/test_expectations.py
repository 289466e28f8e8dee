"""The data gate: real Great Expectations validation, row quarantine and dataset-level gates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DOMAINS, FEATURES, ROWS_PER_PAIR

from stages.core.errors import DataError
from stages.core.expectations import REASON, build_expectations, gate, run_suite, short_classes
from stages.core.params import ValidateParams

LENIENT = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=1)


def _inject(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, str]]:
    """Bad rows, each with the reason the gate must give."""
    frame = frame.copy()
    frame["label"] = frame["label"].astype(float)
    frame.loc[3, "label"] = np.nan
    frame.loc[10, "f1"] = 16.5
    frame.loc[20, "f2"] = np.inf
    frame.loc[30, "f0"] = -np.inf
    frame.loc[40, "f3"] = np.nan
    frame.loc[50, "domain"] = "other"
    frame.loc[60, "domain"] = None
    expected = {
        3: "label is null",
        10: "f1 outside [0, 16]",
        20: "f2 outside [0, 16]",
        30: "f0 outside [0, 16]",
        40: "f3 is null",
        50: "domain not in ['base', 'target']",
        60: "domain is null",
    }
    return frame, expected


def test_clean_frame_passes(raw_frame: pd.DataFrame) -> None:
    result = gate(raw_frame, FEATURES, ValidateParams(), DOMAINS)
    report = result.report
    assert report["rows_in"] == report["rows_clean"] == len(raw_frame)
    assert report["rows_quarantined"] == 0
    assert report["quarantine_fraction"] == 0
    assert report["failures"] == []
    assert all(count == 0 for count in report["checks"].values())
    assert report["passed"] is True
    pd.testing.assert_frame_equal(result.clean, raw_frame)
    assert result.rejected.empty
    assert REASON in result.rejected.columns


def test_bad_rows_are_quarantined_with_their_reason(raw_frame: pd.DataFrame) -> None:
    frame, expected = _inject(raw_frame)
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    rejected = result.rejected
    assert dict(zip(rejected["f0"].index, rejected[REASON], strict=True)) == dict(
        enumerate(expected[row] for row in sorted(expected))
    )
    # The rejected rows keep their original values; the clean rows are every other row.
    pd.testing.assert_frame_equal(
        rejected.drop(columns=REASON), frame.loc[sorted(expected)].reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(
        result.clean, frame.drop(index=list(expected)).reset_index(drop=True), check_dtype=False
    )


def test_clean_labels_are_integers_again_after_a_missing_label(raw_frame) -> None:
    frame, _ = _inject(raw_frame)
    assert frame["label"].dtype == np.float64  # the NaN made the labels float
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert result.clean["label"].dtype == np.int64
    assert sorted(result.clean["label"].unique()) == [0, 1, 2]


def test_report_counts(raw_frame: pd.DataFrame) -> None:
    frame, expected = _inject(raw_frame)
    report = gate(frame, FEATURES, LENIENT, DOMAINS).report
    assert report["rows_in"] == 72
    assert report["rows_quarantined"] == len(expected) == 7
    assert report["rows_clean"] == 72 - 7
    assert report["quarantine_fraction"] == round(7 / 72, 6)
    checks = report["checks"]
    assert checks == {
        "missing_columns": 0,
        "not_null": 3,
        "in_range": 3,
        "known_domain": 1,
        "short_classes": 0,
    }
    assert report["failures"] == []
    # validate writes the report as JSON and logs it to MLflow: plain types only.
    assert json.loads(json.dumps(report)) == report


def test_a_row_failing_several_checks_lists_every_reason(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[5, ["f0", "f3"]] = [-1.0, np.nan]
    frame.loc[5, "domain"] = "elsewhere"
    rejected = gate(frame, FEATURES, LENIENT, DOMAINS).rejected
    assert len(rejected) == 1
    reasons = rejected.loc[0, REASON].split("; ")
    assert sorted(reasons) == sorted(
        ["f0 outside [0, 16]", "f3 is null", "domain not in ['base', 'target']"]
    )


def test_range_bounds_are_inclusive(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[0, "f0"] = 0.0
    frame.loc[1, "f0"] = 16.0
    frame.loc[2, "f0"] = 16.000001
    rejected = gate(frame, FEATURES, LENIENT, DOMAINS).rejected
    assert rejected[REASON].tolist() == ["f0 outside [0, 16]"]
    assert rejected.loc[0, "f0"] == 16.000001


def test_without_a_feature_range_only_non_finite_values_fail(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[0, "f0"] = 1e12
    frame.loc[1, "f1"] = -1e12
    frame.loc[2, "f2"] = np.inf
    params = ValidateParams(feature_range=None, max_quarantine_fraction=1.0)
    result = gate(frame, FEATURES, params, DOMAINS)
    assert result.report["rows_quarantined"] == 1
    assert result.rejected.loc[0, REASON].startswith("f2 outside")
    assert result.rejected.loc[0, "f2"] == np.inf


def test_many_bad_rows_are_all_quarantined(raw_frame: pd.DataFrame) -> None:
    """GX must report every failing row, not a partial sample."""
    frame = pd.concat([raw_frame] * 5, ignore_index=True)
    frame.loc[frame.index % 3 == 0, "f2"] = 99.0
    expected = int((frame.index % 3 == 0).sum())
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert result.report["rows_quarantined"] == expected == 120
    assert (result.clean["f2"] <= 16).all()


def test_non_default_index(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.index = frame.index * 10 + 1000
    frame.loc[1050, "f1"] = np.nan
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert result.rejected[REASON].tolist() == ["f1 is null"]
    assert len(result.clean) == 71
    assert isinstance(result.clean.index, pd.RangeIndex)


@pytest.mark.parametrize("column", ["f2", "label", "domain"])
def test_missing_column_is_a_data_error(raw_frame: pd.DataFrame, column: str) -> None:
    with pytest.raises(DataError, match=rf"missing columns \['{column}'\]"):
        gate(raw_frame.drop(columns=column), FEATURES, ValidateParams(), DOMAINS)


def test_too_many_quarantined_rows_fail_the_gate(raw_frame: pd.DataFrame) -> None:
    frame, expected = _inject(raw_frame)
    result = gate(frame, FEATURES, ValidateParams(max_quarantine_fraction=0.05), DOMAINS)
    report = result.report
    assert report["passed"] is False
    assert len(report["failures"]) == 1
    failure = report["failures"][0]
    assert failure.startswith("validate.max_quarantine_fraction: 7 of 72 rows (9.7%)")
    assert "\n" not in failure
    # Every output is still produced so that the stage can write it before stopping.
    assert len(result.clean) + len(result.rejected) == 72


def test_quarantine_share_at_the_limit_passes(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[[0, 1, 2], "f0"] = 20.0
    report = gate(frame, FEATURES, ValidateParams(max_quarantine_fraction=3 / 72), DOMAINS).report
    assert report["rows_quarantined"] == 3
    assert report["failures"] == []


def test_too_few_rows_per_class_fail_the_gate(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    # Quarantine 3 of the 12 (target, class 2) rows: 9 clean rows remain.
    target_2 = frame.index[(frame["domain"] == "target") & (frame["label"] == 2)]
    frame.loc[target_2[:3], "f0"] = -5.0
    params = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=10)
    report = gate(frame, FEATURES, params, DOMAINS).report
    assert report["checks"]["short_classes"] == 1
    assert report["failures"] == [
        "validate.min_rows_per_class: class 2 has 9 clean rows in domain 'target' (< 10); "
        "1 (domain, class) pairs short"
    ]


def test_both_dataset_gates_are_listed(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[frame.index[:20], "f3"] = np.nan
    params = ValidateParams(max_quarantine_fraction=0.1, min_rows_per_class=ROWS_PER_PAIR)
    report = gate(frame, FEATURES, params, DOMAINS).report
    assert [f.split(":")[0] for f in report["failures"]] == [
        "validate.max_quarantine_fraction",
        "validate.min_rows_per_class",
    ]


def test_class_absent_from_one_domain_is_short(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame[~((raw_frame["domain"] == "base") & (raw_frame["label"] == 1))]
    frame = frame.reset_index(drop=True)
    short = short_classes(frame, min_rows=5, domains=DOMAINS)
    assert short.to_dict() == {("base", 1): 0}
    report = gate(frame, FEATURES, ValidateParams(), DOMAINS).report
    assert "class 1 has 0 clean rows in domain 'base'" in report["failures"][0]


def test_configured_domain_without_clean_rows_is_short(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[frame["domain"] == "target", "f0"] = 255.0  # e.g. a scanner writing 0-255
    report = gate(frame, FEATURES, ValidateParams(max_quarantine_fraction=1.0), DOMAINS).report
    assert report["rows_clean"] == 36
    assert report["checks"]["short_classes"] == 3


def test_suite_has_one_expectation_per_check() -> None:
    expectations = build_expectations(["a", "b"], ValidateParams(), ["base", "target"])
    kinds = [type(e).__name__ for e in expectations]
    assert kinds.count("ExpectColumnToExist") == 4  # a, b, label, domain
    assert kinds.count("ExpectColumnValuesToNotBeNull") == 4
    assert kinds.count("ExpectColumnValuesToBeBetween") == 2
    assert kinds.count("ExpectColumnValuesToBeInSet") == 1


def test_run_suite_returns_a_gx_result(raw_frame: pd.DataFrame) -> None:
    expectations = build_expectations(FEATURES, ValidateParams(), DOMAINS)
    result = run_suite(raw_frame, expectations)
    assert result.success is True
    assert len(result.results) == len(expectations)
    # A suite owns its expectations: a second run needs a fresh list.
    bad = raw_frame.assign(f0=raw_frame["f0"] + 100)
    again = run_suite(bad, build_expectations(FEATURES, ValidateParams(), DOMAINS))
    assert again.success is False
    failed = {r.expectation_config.kwargs["column"] for r in again.results if not r.success}
    assert failed == {"f0"}


def test_a_class_that_lost_every_row_is_short(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[frame["label"] == 2, "f0"] = -1.0  # every row of class 2, in both domains
    params = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=5)
    report = gate(frame, FEATURES, params, DOMAINS).report
    assert report["rows_clean"] == 48
    assert report["checks"]["short_classes"] == 2
    assert "class 2 has 0 clean rows in domain 'base'" in report["failures"][0]
