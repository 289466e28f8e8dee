"""Property: whatever the damage, the gate loses nothing and lets nothing bad through."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import DOMAINS, FEATURES, make_raw_frame
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stages.core.common.data_params import ValidateParams
from stages.core.data.expectations import RAW_ROW, REASON, gate

BASE = make_raw_frame(rows_per_pair=4, seed=11)  # 24 rows
LENIENT = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=1)
ROW_DAMAGE = ["nan", "inf", "-inf", "too_high", "too_low", "no_label", "other_domain", "no_domain"]
COPY_DAMAGE = ["duplicate", "conflict"]

damage = st.lists(
    st.tuples(
        st.integers(0, len(BASE) - 1),  # the row damaged
        st.sampled_from(ROW_DAMAGE + COPY_DAMAGE),
        st.sampled_from(FEATURES),
        st.integers(0, len(BASE) - 1),  # the row copied, for duplicates and conflicts
    ),
    max_size=12,
)


def corrupt(changes: list[tuple[int, str, str, int]]) -> tuple[pd.DataFrame, set[int]]:
    """The damaged frame, and the rows that hold a bad value (they must be quarantined)."""
    frame = BASE.copy()
    frame["label"] = frame["label"].astype(float)
    frame["domain"] = frame["domain"].astype(object)
    bad: set[int] = set()
    for row, kind, column, other in changes:
        if kind in COPY_DAMAGE:
            frame.loc[row, FEATURES] = frame.loc[other, FEATURES].to_numpy()
            if kind == "duplicate":
                frame.loc[row, ["label", "domain"]] = frame.loc[other, ["label", "domain"]]
            else:
                frame.loc[row, "label"] = (frame.loc[other, "label"] + 1) % 3
            continue
        value = {
            "nan": np.nan,
            "inf": np.inf,
            "-inf": -np.inf,
            "too_high": 16.5,
            "too_low": -0.5,
        }.get(kind)
        if kind == "no_label":
            frame.loc[row, "label"] = np.nan
        elif kind == "other_domain":
            frame.loc[row, "domain"] = "elsewhere"
        elif kind == "no_domain":
            frame.loc[row, "domain"] = None
        else:
            frame.loc[row, column] = value
    # Judge the final frame, not the history: a later copy can overwrite a bad value.
    values = frame[FEATURES].to_numpy()
    out = np.isnan(values) | (values < 0) | (values > 16)
    bad |= set(np.flatnonzero(out.any(axis=1)).tolist())
    bad |= set(np.flatnonzero(frame["label"].isna()).tolist())
    bad |= set(np.flatnonzero(~frame["domain"].isin(DOMAINS)).tolist())
    return frame, bad


@settings(max_examples=40, deadline=None)
@given(damage)
# Found by Hypothesis: two rows of different domains end up with the same features and the same
# label. Both are valid rows (the domain is part of a row), so both stay.
@example([(0, "conflict", "f0", 12), (12, "conflict", "f0", 12)])
def test_nothing_is_lost_and_nothing_bad_gets_through(changes) -> None:
    frame, bad = corrupt(changes)
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    report, clean, rejected = result.report, result.clean, result.rejected

    # The numbers add up.
    assert report["rows_in"] == len(frame) == report["rows_clean"] + report["rows_quarantined"]
    assert len(clean) == report["rows_clean"] and len(rejected) == report["rows_quarantined"]

    # Rejected rows keep every original column and value, and say why.
    assert list(rejected.columns) == [*frame.columns, REASON, RAW_ROW]
    original = frame.iloc[rejected[RAW_ROW].to_numpy()].reset_index(drop=True)
    pd.testing.assert_frame_equal(rejected[list(frame.columns)], original)
    assert (rejected[REASON].str.len() > 0).all()

    # Clean rows are exactly the other rows, in order.
    kept = frame.drop(index=rejected[RAW_ROW].tolist()).reset_index(drop=True)
    pd.testing.assert_frame_equal(clean, kept, check_dtype=False)

    # Every bad value is quarantined; the clean table holds none, no exact duplicate, and no
    # features that carry two labels.
    assert bad <= set(rejected[RAW_ROW])
    values = clean[FEATURES].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 16).all()
    assert clean["domain"].isin(DOMAINS).all() and clean["label"].notna().all()
    assert not clean.duplicated().any()
    assert (clean.groupby(FEATURES)["label"].nunique() == 1).all()
