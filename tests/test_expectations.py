"""The data gate: real Great Expectations validation, row quarantine and dataset-level gates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DOMAINS, FEATURES, ROWS_PER_PAIR, make_raw_frame

from stages.core.common.data_params import ValidateParams
from stages.core.common.errors import DataError
from stages.core.data.expectations import RAW_ROW, REASON, gate, run_suite, short_classes
from stages.core.data.suites import infer_suite, load_suite, params_suite, suite_json

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
        3: "label is missing",
        10: "f1 = 16.5 outside [0, 16]",
        20: "f2 is inf",
        30: "f0 is -inf",
        40: "f3 is missing",
        50: "domain 'other' not in ['base', 'target']",
        60: "domain is missing",
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
    assert list(result.rejected.columns) == [*raw_frame.columns, REASON, RAW_ROW]


def test_bad_rows_are_quarantined_with_their_reason(raw_frame: pd.DataFrame) -> None:
    frame, expected = _inject(raw_frame)
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    rejected = result.rejected
    assert dict(zip(rejected["f0"].index, rejected[REASON], strict=True)) == dict(
        enumerate(expected[row] for row in sorted(expected))
    )
    # The rejected rows keep their original values; the clean rows are every other row.
    assert rejected[RAW_ROW].tolist() == sorted(expected)
    pd.testing.assert_frame_equal(
        rejected.drop(columns=[REASON, RAW_ROW]),
        frame.loc[sorted(expected)].reset_index(drop=True),
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
        "duplicate": 0,
        "conflicting_label": 0,
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
        ["f0 = -1 outside [0, 16]", "f3 is missing", "domain 'elsewhere' not in ['base', 'target']"]
    )


def test_range_bounds_are_inclusive(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[0, "f0"] = 0.0
    frame.loc[1, "f0"] = 16.0
    frame.loc[2, "f0"] = 16.000001
    rejected = gate(frame, FEATURES, LENIENT, DOMAINS).rejected
    assert rejected[REASON].tolist() == ["f0 = 16 outside [0, 16]"]
    assert rejected.loc[0, "f0"] == 16.000001


def test_without_a_feature_range_only_non_finite_values_fail(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[0, "f0"] = 1e12
    frame.loc[1, "f1"] = -1e12
    frame.loc[2, "f2"] = np.inf
    params = ValidateParams(feature_range=None, max_quarantine_fraction=1.0)
    result = gate(frame, FEATURES, params, DOMAINS)
    assert result.report["rows_quarantined"] == 1
    assert result.rejected.loc[0, REASON] == "f2 is inf"
    assert result.rejected.loc[0, "f2"] == np.inf


def test_many_bad_rows_are_all_quarantined(raw_frame: pd.DataFrame) -> None:
    """GX must report every failing row, not a partial sample."""
    frame = make_raw_frame(rows_per_pair=60)
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
    assert result.rejected[REASON].tolist() == ["f1 is missing"]
    assert result.rejected[RAW_ROW].tolist() == [5]  # the position, not the index label
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


def test_suite_has_a_fixed_number_of_expectations() -> None:
    """One multicolumn expectation per check over the feature block, whatever its width."""
    features = [f"f{i}" for i in range(64)]
    suite = params_suite(features, ValidateParams(), ["base", "target"])
    assert [(e["type"], e["kwargs"].get("column")) for e in suite] == [
        ("expect_table_columns_to_match_set", None),
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_not_be_null", "label"),
        ("expect_column_values_to_not_be_null", "domain"),
        ("expect_multicolumn_values_to_be_numeric", None),
        ("expect_multicolumn_values_to_not_be_null", None),
        ("expect_multicolumn_values_to_be_between", None),
        ("expect_multicolumn_rows_to_be_unique", None),
        ("expect_column_values_to_be_in_set", "domain"),
    ]
    assert suite[0]["kwargs"]["column_set"] == [*features, "label", "domain"]
    assert suite[6]["kwargs"] == {"column_list": features, "min_value": 0.0, "max_value": 16.0}


def test_one_feature_uses_gx_column_expectations(raw_frame: pd.DataFrame) -> None:
    suite = params_suite(["f0"], ValidateParams(), DOMAINS)
    kinds = {e["type"] for e in suite if e["kwargs"].get("column") == "f0"}
    assert kinds == {
        "expect_column_values_to_be_in_type_list",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_unique",
    }
    frame = raw_frame[["f0", "label", "domain"]].copy()
    frame.loc[3, "f0"] = np.nan
    frame.loc[4, "f0"] = 17.0
    frame.loc[6] = frame.loc[5]
    result = gate(frame, ["f0"], LENIENT, DOMAINS)
    assert dict(zip(result.rejected[RAW_ROW], result.rejected[REASON], strict=True)) == {
        3: "f0 is missing",
        4: "f0 = 17 outside [0, 16]",
        6: "duplicate of row 5",
    }


def test_run_suite_returns_a_gx_result(raw_frame: pd.DataFrame) -> None:
    suite = params_suite(FEATURES, ValidateParams(), DOMAINS)
    result = run_suite(raw_frame, suite)
    assert result.success is True
    assert len(result.results) == len(suite)
    bad = raw_frame.assign(f0=raw_frame["f0"] + 100)
    again = run_suite(bad, suite)
    assert again.success is False
    failed = [r for r in again.results if not r.success]
    assert [r.expectation_config.type for r in failed] == [
        "expect_multicolumn_values_to_be_between"
    ]
    assert failed[0].result["unexpected_index_list"] == list(range(len(raw_frame)))


def test_a_class_that_lost_every_row_is_short(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[frame["label"] == 2, "f0"] = -1.0  # every row of class 2, in both domains
    params = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=5)
    report = gate(frame, FEATURES, params, DOMAINS).report
    assert report["rows_clean"] == 48
    assert report["checks"]["short_classes"] == 2
    assert "class 2 has 0 clean rows in domain 'base'" in report["failures"][0]


# --- duplicates and conflicting labels ----------------------------------------------------


def test_exact_duplicates_keep_the_first_copy(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[[30, 50]] = frame.loc[[10, 10]].to_numpy()
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert result.rejected[RAW_ROW].tolist() == [30, 50]
    assert result.rejected[REASON].tolist() == ["duplicate of row 10"] * 2
    assert result.report["checks"]["duplicate"] == 2
    assert result.report["checks"]["conflicting_label"] == 0
    assert (result.clean[FEATURES] == frame.loc[10, FEATURES].to_numpy()).all(axis=1).sum() == 1


def test_identical_features_with_conflicting_labels_quarantine_every_copy(raw_frame) -> None:
    frame = raw_frame.copy()
    frame.loc[[20, 40], FEATURES] = frame.loc[[5, 5], FEATURES].to_numpy()
    frame.loc[20, "label"] = (frame.loc[5, "label"] + 1) % 3
    frame.loc[40, "label"] = frame.loc[5, "label"]
    frame.loc[40, "domain"] = frame.loc[5, "domain"]
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    reasons = dict(zip(result.rejected[RAW_ROW], result.rejected[REASON], strict=True))
    assert reasons == {
        5: "features identical to row 20, 40 with another label",
        20: "features identical to row 5, 40 with another label",
        40: "features identical to row 5, 20 with another label",
    }
    assert result.report["checks"]["conflicting_label"] == 3


def test_same_features_and_label_in_two_domains_are_kept(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    other = frame.index[(frame["domain"] == "target") & (frame["label"] == frame.loc[0, "label"])]
    frame.loc[other[0], FEATURES] = frame.loc[0, FEATURES].to_numpy()
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert result.report["rows_quarantined"] == 0


def test_a_copy_with_a_missing_label_is_not_a_conflict(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame["label"] = frame["label"].astype(float)
    frame.loc[9, FEATURES] = frame.loc[8, FEATURES].to_numpy()
    frame.loc[9, "label"] = np.nan
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert dict(zip(result.rejected[RAW_ROW], result.rejected[REASON], strict=True)) == {
        9: "label is missing"
    }


def test_a_duplicate_keeps_its_other_reasons(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.copy()
    frame.loc[3, "f2"] = 99.0
    frame.loc[4] = frame.loc[3]
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    assert result.rejected[REASON].tolist() == [
        "f2 = 99 outside [0, 16]",
        "f2 = 99 outside [0, 16]; duplicate of row 3",
    ]


# --- table-level checks stop the stage ----------------------------------------------------


def test_no_rows_stops_the_stage(raw_frame: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"dataset\.parquet: 0 rows, expected at least 1$"):
        gate(raw_frame.iloc[:0], FEATURES, ValidateParams(), DOMAINS)


def test_non_numeric_feature_stops_the_stage(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.assign(f1=raw_frame["f1"].astype(object))
    frame.loc[[4, 9], "f1"] = ["n/a", "?"]
    with pytest.raises(DataError) as caught:
        gate(frame, FEATURES, ValidateParams(), DOMAINS)
    assert str(caught.value).startswith(
        "data/raw/dataset.parquet: column 'f1' is not numeric: 2 values are not numbers "
        "(first 'n/a' in row 4); fix them in the source or drop the column from data.features"
    )


def test_numbers_stored_as_text_pass_the_numeric_check(raw_frame: pd.DataFrame) -> None:
    frame = raw_frame.assign(f1=raw_frame["f1"].astype(str).astype(object))
    result = gate(frame, FEATURES, ValidateParams(), DOMAINS)
    assert result.report["rows_quarantined"] == 0


# --- a suite inferred from the data, committed as JSON ------------------------------------


def test_inferred_suite_round_trips_through_json(tmp_path, raw_frame: pd.DataFrame) -> None:
    suite = infer_suite(raw_frame, FEATURES, DOMAINS)
    path = tmp_path / "suite.json"
    path.write_text(suite_json(suite))
    assert load_suite(path) == suite
    assert suite_json(load_suite(path)) == path.read_text()  # stable bytes
    (between,) = [
        e["kwargs"] for e in suite if e["type"] == "expect_multicolumn_values_to_be_between"
    ]
    assert between["column_list"] == FEATURES
    assert between["min_value"] == raw_frame[FEATURES].min().tolist()
    assert between["max_value"] == raw_frame[FEATURES].max().tolist()
    label_set = next(
        e["kwargs"]["value_set"]
        for e in suite
        if e["kwargs"].get("column") == "label" and e["type"] == "expect_column_values_to_be_in_set"
    )
    assert label_set == [0, 1, 2]


def test_validating_against_an_inferred_suite(raw_frame: pd.DataFrame) -> None:
    suite = infer_suite(raw_frame, FEATURES, DOMAINS)
    frame = raw_frame.copy()
    high = raw_frame["f0"].max()
    frame.loc[2, "f0"] = high + 1  # inside [0, 16] but above anything seen when inferring
    frame.loc[7, "label"] = 7  # a class the suite does not know
    result = gate(frame, FEATURES, LENIENT, DOMAINS, suite=suite)
    reasons = dict(zip(result.rejected[RAW_ROW], result.rejected[REASON], strict=True))
    assert reasons[2] == f"f0 = {high + 1:g} outside [{raw_frame['f0'].min():g}, {high:g}]"
    assert reasons[7] == "label 7 not in [0, 1, 2]"
    assert result.report["checks"]["known_label"] == 1
    # A class the suite rejects is not a class that lost its rows.
    assert result.report["checks"]["short_classes"] == 0
    # The params suite would have let the first row through.
    assert 2 not in gate(frame, FEATURES, LENIENT, DOMAINS).rejected[RAW_ROW].tolist()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found; write one with `python -m stages.validate --infer-suite"),
        ("{not json", "not valid JSON ("),
        ('{"expectations": []}', "expected an object with a non-empty 'expectations' list"),
        ('{"expectations": [{"kwargs": {}}]}', "expectation 1 has no 'type'"),
        (
            '{"expectations": [{"type": "expect_table_row_count_to_be_between", "kwargs": [1]}]}',
            "expectation 1: 'kwargs' must be an object",
        ),
        (
            '{"expectations": [{"type": "expect_column_values_to_be_purple", "kwargs": {}}]}',
            "expectation 1 (expect_column_values_to_be_purple): ",
        ),
        (
            '{"expectations": [{"type": "expect_column_values_to_be_between",'
            ' "kwargs": {"min_value": 0}}]}',
            "expectation 1 (expect_column_values_to_be_between): ",
        ),
    ],
)
def test_bad_suite_file_is_one_line(tmp_path, content: str | None, expected: str) -> None:
    path = tmp_path / "suite.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as caught:
        load_suite(path)
    message = str(caught.value)
    assert message.startswith(f"validate.suite: {path}: ")
    assert expected in message
    assert "\n" not in message


def test_a_few_bad_pixels_in_the_demo_quarantine_only_their_rows() -> None:
    """The issue's first failure: ~2% of rows with NaN, inf or out-of-range pixels stopped the
    pipeline with half the dataset quarantined (the rendering bound moved with them)."""
    from stages.core.common.data_params import DataParams
    from stages.core.data.ingest import build_raw_dataset
    from stages.core.data.sources import load_sklearn

    digits = load_sklearn("digits")
    pixels = [c for c in digits.columns if c != "label"]
    digits[pixels] = digits[pixels].astype(np.float64)
    rng = np.random.default_rng(4)
    bad = rng.choice(len(digits), size=36, replace=False)
    for i, row in enumerate(bad):
        digits.loc[row, pixels[i % 64]] = [np.nan, np.inf, -np.inf, 300.0][i % 4]
    params = ValidateParams()
    raw = build_raw_dataset(digits, DataParams(), params.feature_range)
    result = gate(raw, pixels, params, ["base", "target"])
    assert result.report["rows_quarantined"] == 36
    assert sorted(result.rejected[RAW_ROW]) == sorted(bad.tolist())
    assert result.report["passed"] is True


def _hand_edited_suite(tmp_path, dropped: set[str]) -> list[dict]:
    """A committed suite file whose not-null checks on ``dropped`` columns were deleted."""
    suite = [
        item
        for item in params_suite(FEATURES, LENIENT, DOMAINS)
        if not (item["type"].endswith("_not_be_null") and item["kwargs"].get("column") in dropped)
    ]
    path = tmp_path / "raw.json"
    path.write_text(suite_json(suite))
    loaded = load_suite(path)
    assert len(loaded) == len(params_suite(FEATURES, LENIENT, DOMAINS)) - len(dropped)
    return loaded


@pytest.mark.parametrize("dropped", [{"label"}, {"label", "domain"}])
def test_rows_without_a_label_are_quarantined_whatever_the_suite_says(
    tmp_path, raw_frame: pd.DataFrame, dropped: set[str]
) -> None:
    suite = _hand_edited_suite(tmp_path, dropped)
    frame = raw_frame.copy()
    frame["label"] = frame["label"].astype(float)
    frame.loc[[3, 40], "label"] = np.nan
    frame.loc[60, "domain"] = None
    result = gate(frame, FEATURES, LENIENT, DOMAINS, suite)
    rejected = result.rejected
    assert dict(zip(rejected[RAW_ROW], rejected[REASON], strict=True)) == {
        3: "label is missing",
        40: "label is missing",
        60: "domain is missing",
    }
    assert result.clean["label"].notna().all() and result.clean["domain"].notna().all()
    report = result.report
    assert report["rows_in"] == 72 == report["rows_clean"] + report["rows_quarantined"]
    assert report["rows_quarantined"] == 3
    checks = [(e["type"], e["column"]) for e in result.expectations]
    assert ("expect_column_values_to_not_be_null", "label") in checks  # listed in the report


def test_a_suite_checking_the_label_elsewhere_gets_no_second_check(raw_frame) -> None:
    suite = [
        item
        for item in params_suite(FEATURES, LENIENT, DOMAINS)
        if not item["type"].endswith("_not_be_null")
    ]
    suite.append(
        {
            "type": "expect_multicolumn_values_to_not_be_null",
            "kwargs": {"column_list": [*FEATURES, "label", "domain"]},
        }
    )
    frame = raw_frame.copy()
    frame["label"] = frame["label"].astype(float)
    frame.loc[3, "label"] = np.nan
    result = gate(frame, FEATURES, LENIENT, DOMAINS, suite)
    assert result.rejected[REASON].tolist() == ["label is missing"]  # once, not twice
    assert len(result.expectations) == len(suite)
