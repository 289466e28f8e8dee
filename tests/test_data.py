"""Ingest: a source -> the canonical raw table (features as float, then label, then domain)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.core.common.data_params import DataParams
from stages.core.common.errors import DataError
from stages.core.common.schema import DOMAIN, LABEL
from stages.core.data.ingest import (
    assign_domains,
    build_raw_dataset,
    render_target,
    resolve_features,
    skipped_columns,
)
from stages.core.data.sources import load_source


@pytest.fixture(scope="module")
def digits() -> pd.DataFrame:
    return load_source(DataParams())


@pytest.fixture(scope="module")
def digits_raw(digits: pd.DataFrame) -> pd.DataFrame:
    return build_raw_dataset(digits, DataParams())


@pytest.fixture(scope="module")
def pixels(digits: pd.DataFrame) -> list[str]:
    return [c for c in digits.columns if c != LABEL]


def test_digits_source(digits: pd.DataFrame, pixels: list[str]) -> None:
    assert digits.shape == (1797, 65)
    assert len(pixels) == 64
    assert sorted(digits[LABEL].unique()) == list(range(10))
    assert digits[pixels].to_numpy().max() == 16


def test_digits_raw_schema(digits_raw: pd.DataFrame, pixels: list[str]) -> None:
    assert digits_raw.shape == (1797, 66)
    assert list(digits_raw.columns) == [*pixels, LABEL, DOMAIN]
    assert all(digits_raw[c].dtype == np.float64 for c in pixels)
    assert isinstance(digits_raw.index, pd.RangeIndex)
    assert set(digits_raw[DOMAIN]) == {"base", "target"}


def test_digits_domains_are_disjoint_halves(digits: pd.DataFrame, digits_raw) -> None:
    # Every source image appears once, in exactly one domain.
    assert len(digits_raw) == len(digits)
    assert digits_raw[DOMAIN].isin(["base", "target"]).all()
    counts = digits_raw[DOMAIN].value_counts()
    assert counts.sum() == 1797
    assert abs(counts["target"] - counts["base"]) <= 1


def test_digits_domains_are_stratified(digits_raw: pd.DataFrame) -> None:
    per_class = pd.crosstab(digits_raw[LABEL], digits_raw[DOMAIN])
    assert list(per_class.index) == list(range(10))
    assert (per_class["target"] - per_class["base"]).abs().max() <= 2
    assert (per_class.min(axis=1) >= 85).all()


def test_target_domain_is_inverted(digits: pd.DataFrame, digits_raw, pixels) -> None:
    is_target = (digits_raw[DOMAIN] == "target").to_numpy()
    source = digits[pixels].to_numpy(np.float64)
    rendered = digits_raw[pixels].to_numpy()
    np.testing.assert_array_equal(rendered[is_target], 16.0 - source[is_target])
    np.testing.assert_array_equal(rendered[~is_target], source[~is_target])
    np.testing.assert_array_equal(digits_raw[LABEL].to_numpy(), digits[LABEL].to_numpy())
    assert rendered.min() == 0 and rendered.max() == 16


def test_ingest_is_seeded(digits: pd.DataFrame, digits_raw: pd.DataFrame) -> None:
    again = build_raw_dataset(digits, DataParams())
    pd.testing.assert_frame_equal(again, digits_raw)
    other = build_raw_dataset(digits, DataParams(seed=7))
    assert not other[DOMAIN].equals(digits_raw[DOMAIN])
    assert other[DOMAIN].value_counts().to_dict() == digits_raw[DOMAIN].value_counts().to_dict()


def test_target_fraction_and_no_transform(digits: pd.DataFrame, pixels) -> None:
    raw = build_raw_dataset(digits, DataParams(target_fraction=0.25, target_transform="none"))
    assert (raw[DOMAIN] == "target").sum() == pytest.approx(0.25 * 1797, abs=1)
    np.testing.assert_array_equal(raw[pixels].to_numpy(), digits[pixels].to_numpy(np.float64))


def test_custom_domain_names(digits: pd.DataFrame) -> None:
    raw = build_raw_dataset(digits, DataParams(base_domain="light", target_domain="dark"))
    assert set(raw[DOMAIN]) == {"light", "dark"}


def test_assign_domains_is_stratified_and_seeded() -> None:
    labels = pd.Series(np.repeat([0, 1, 2, 3], 10), index=np.arange(100, 140))
    domain = assign_domains(labels, 0.3, seed=3, base="b", target="t")
    assert domain.index.equals(labels.index)
    assert pd.crosstab(labels, domain)["t"].tolist() == [3, 3, 3, 3]
    assert domain.equals(assign_domains(labels, 0.3, seed=3, base="b", target="t"))


def test_render_target_reflects_inside_the_bounds() -> None:
    frame = pd.DataFrame({"a": [0.0, 4.0], "b": [10.0, 2.0]})
    rendered = render_target(frame, "invert", (0.0, 10.0))
    assert rendered.to_dict("list") == {"a": [10.0, 6.0], "b": [0.0, 8.0]}
    assert render_target(frame, "invert", (2.0, 10.0)).to_dict("list") == {
        "a": [12.0, 8.0],
        "b": [2.0, 10.0],
    }
    assert render_target(frame, "none", (0.0, 10.0)) is frame


def _own_source(rows_per_site: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 2 * rows_per_site
    return pd.DataFrame(
        {
            "height": rng.uniform(0, 10, n),
            "weight": rng.integers(0, 10, n),
            "note": ["x"] * n,
            "diagnosis": np.tile([0, 1], rows_per_site),
            "site": ["A"] * rows_per_site + ["B"] * rows_per_site,
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_source_with_a_domain_column(tmp_path: Path, suffix: str) -> None:
    source = _own_source()
    path = tmp_path / "data" / f"own{suffix}"
    path.parent.mkdir()
    if suffix == ".csv":
        source.to_csv(path, index=False)
    else:
        source.to_parquet(path, index=False)
    params = DataParams(
        source=f"data/own{suffix}",
        label="diagnosis",
        domain_column="site",
        base_domain="A",
        target_domain="B",
    )
    loaded = load_source(params, root=tmp_path)
    raw = build_raw_dataset(loaded, params)
    # Numeric columns only, label and domain column excluded; values are not transformed.
    assert list(raw.columns) == ["height", "weight", LABEL, DOMAIN]
    assert raw["weight"].dtype == np.float64
    np.testing.assert_allclose(raw["height"], source["height"])
    assert raw[LABEL].tolist() == source["diagnosis"].tolist()
    assert raw[DOMAIN].tolist() == source["site"].tolist()


def test_numeric_domain_column_becomes_strings() -> None:
    source = _own_source().assign(site=[1] * 6 + [2] * 6)
    params = DataParams(label="diagnosis", domain_column="site", base_domain="1", target_domain="2")
    raw = build_raw_dataset(source, params)
    assert raw[DOMAIN].tolist() == ["1"] * 6 + ["2"] * 6
    assert "site" not in raw.columns


def test_explicit_features_keep_their_order() -> None:
    params = DataParams(label="diagnosis", features=["weight", "height"], domain_column="site")
    raw = build_raw_dataset(_own_source(), params)
    assert list(raw.columns) == ["weight", "height", LABEL, DOMAIN]


def test_missing_label_column() -> None:
    with pytest.raises(DataError, match=r"data\.label: column 'diagnosis' not in "):
        build_raw_dataset(_own_source().drop(columns="diagnosis"), DataParams(label="diagnosis"))


def test_missing_domain_column() -> None:
    params = DataParams(label="diagnosis", domain_column="hospital")
    with pytest.raises(DataError, match=r"data\.domain_column: column 'hospital'"):
        build_raw_dataset(_own_source(), params)


def test_missing_feature_column() -> None:
    params = DataParams(label="diagnosis", features=["height", "age"])
    with pytest.raises(DataError, match=r"data\.features: .*\['age'\]"):
        resolve_features(_own_source(), params)


def test_feature_may_not_be_called_domain() -> None:
    source = _own_source().rename(columns={"weight": DOMAIN})
    with pytest.raises(DataError, match=r"data\.features: .*may not be named \['domain'\]"):
        resolve_features(source, DataParams(label="diagnosis", domain_column="site"))


def test_no_numeric_features() -> None:
    source = pd.DataFrame({"name": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match="no numeric feature columns"):
        resolve_features(source, DataParams())


def test_class_too_small_to_stratify_still_ingests() -> None:
    # A one-row class cannot be split between domains; the validate gate's
    # min_rows_per_class reports it, ingest must not crash on it.
    source = pd.DataFrame({"a": np.arange(21.0), "label": [0] * 10 + [1] * 10 + [2]})
    raw = build_raw_dataset(source, DataParams())
    assert len(raw) == 21
    assert (raw["domain"] == "target").sum() == 10
    assert raw.loc[raw["label"] == 2, "domain"].tolist() == ["base"]


def test_missing_labels_do_not_crash_ingest() -> None:
    source = pd.DataFrame({"a": np.arange(20.0), "label": [0.0] * 9 + [1.0] * 9 + [np.nan, np.nan]})
    # Rows without a label reach validate, which quarantines them with a reason.
    raw = build_raw_dataset(source, DataParams())
    assert len(raw) == 20
    assert raw["label"].isna().sum() == 2
    assert raw["label"].tolist()[:18] == [0.0] * 9 + [1.0] * 9
    # The unlabelled rows form a group of their own, split between the domains like a class.
    assert sorted(raw["domain"].tolist()[18:]) == ["base", "target"]


# --- issue 8: the five failures a new user hit -------------------------------------------


def test_bad_values_do_not_change_other_rows(digits: pd.DataFrame, pixels) -> None:
    """About 2% of rows with NaN, inf or out-of-range pixels must not move any other row."""
    dirty = digits.copy()
    dirty[pixels] = dirty[pixels].astype(np.float64)
    rng = np.random.default_rng(1)
    bad = rng.choice(len(dirty), size=36, replace=False)
    for i, row in enumerate(bad):
        dirty.loc[row, pixels[i % 64]] = [np.nan, np.inf, -np.inf, 300.0][i % 4]
    clean_raw = build_raw_dataset(digits, DataParams(), feature_range=(0, 16))
    dirty_raw = build_raw_dataset(dirty, DataParams(), feature_range=(0, 16))
    untouched = np.setdiff1d(np.arange(len(digits)), bad)
    pd.testing.assert_frame_equal(dirty_raw.loc[untouched], clean_raw.loc[untouched])
    is_target = (clean_raw[DOMAIN] == "target").to_numpy()
    expected = 16.0 - digits[pixels].to_numpy(np.float64)
    np.testing.assert_array_equal(
        dirty_raw.loc[untouched][pixels].to_numpy()[is_target[untouched]],
        expected[untouched][is_target[untouched]],
    )


def test_bad_values_stay_bad_after_rendering() -> None:
    # Reflection inside the range keeps an out-of-range value out of range.
    frame = pd.DataFrame({"a": [0.0, 16.0, 20.0, -3.0, np.inf, np.nan]})
    rendered = render_target(frame, "invert", (0.0, 16.0))
    assert rendered["a"].tolist()[:4] == [16.0, 0.0, -4.0, 19.0]
    assert rendered["a"].iloc[4] == -np.inf
    assert np.isnan(rendered["a"].iloc[5])


def test_without_a_range_the_bound_is_the_finite_extent() -> None:
    frame = pd.DataFrame({"a": [1.0, 5.0, np.inf], "b": [3.0, np.nan, -np.inf]})
    rendered = render_target(frame, "invert", None)
    # Finite values span [1, 5]: x -> 1 + 5 - x.
    assert rendered["a"].tolist()[:2] == [5.0, 1.0]
    assert rendered["b"].iloc[0] == 3.0


def test_empty_csv_says_it_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match=r"empty\.csv: the file has no rows") as caught:
        params = DataParams(source="empty.csv")
        build_raw_dataset(load_source(params, root=tmp_path), params)
    assert "\n" not in str(caught.value)


def test_non_numeric_listed_feature_is_one_line() -> None:
    source = _own_source().assign(height=["tall"] + ["1.5"] * 11)
    params = DataParams(
        source="data/source/own.csv", label="diagnosis", features=["height", "weight"]
    )
    with pytest.raises(DataError) as caught:
        build_raw_dataset(source, params)
    message = str(caught.value)
    assert message.startswith("data/source/own.csv: column 'height' (data.features) is not numeric")
    assert "1 of 12 values" in message and "'tall' on line 2" in message
    assert "\n" not in message


def test_numeric_text_in_a_listed_feature_is_converted() -> None:
    source = _own_source().assign(height=["1.5"] * 12)
    params = DataParams(label="diagnosis", features=["height"], domain_column="site")
    raw = build_raw_dataset(source, params)
    assert raw["height"].tolist() == [1.5] * 12


def test_numeric_domain_column_with_a_missing_value_reads_without_dot_zero() -> None:
    source = _own_source().assign(site=[1] * 5 + [None] + [2] * 6)
    assert source["site"].dtype == np.float64
    params = DataParams(label="diagnosis", domain_column="site", base_domain="1", target_domain="2")
    raw = build_raw_dataset(source, params)
    assert raw[DOMAIN].tolist()[:5] == ["1"] * 5
    assert raw[DOMAIN].tolist()[6:] == ["2"] * 6
    assert pd.isna(raw[DOMAIN].iloc[5])


def test_skipped_columns_are_named() -> None:
    source = _own_source().assign(weight=["7"] * 11 + ["heavy"])  # a stray word: now text
    params = DataParams(label="diagnosis", domain_column="site")
    assert skipped_columns(source, params) == ["weight", "note"]
    listed = DataParams(label="diagnosis", domain_column="site", features=["height"])
    assert skipped_columns(_own_source(), listed) == ["weight", "note"]
