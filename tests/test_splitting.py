"""Split: stratified, seeded, disjoint train/val/test inside each domain."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_raw_frame

from stages.core.common import layout
from stages.core.common.data_params import SplitParams
from stages.core.common.errors import DataError
from stages.core.data.splitting import (
    PARTS,
    check_leakage,
    shared_feature_rows,
    split_domains,
    split_frame,
)

ROLES = {"base": "base", "target": "target"}


@pytest.fixture
def frame() -> pd.DataFrame:
    """2 domains x 3 classes x 40 rows, each row with a unique ``uid``."""
    frame = make_raw_frame(rows_per_pair=40, seed=3)
    return frame.assign(uid=range(len(frame)))


def _expected_sizes(n: int, params: SplitParams) -> dict[str, int]:
    """scikit-learn's rule for float sizes: test = ceil(n * share), train = the rest."""
    test = math.ceil(n * params.test_size)
    val_share = params.val_size / (1 - params.test_size)  # of the rows left after test
    val = math.ceil((n - test) * val_share)
    return {"train": n - test - val, "val": val, "test": test}


def test_keys_and_sizes(frame: pd.DataFrame) -> None:
    params = SplitParams()
    splits = split_domains(frame, params, ROLES)
    assert list(splits) == [f"{r}_{p}" for r in ("base", "target") for p in PARTS]
    expected = _expected_sizes(120, params)
    for role in ROLES:
        sizes = {p: len(splits[f"{role}_{p}"]) for p in PARTS}
        assert sizes == expected
        assert sizes["test"] == 24
        assert sizes["val"] == pytest.approx(12, abs=1)
        assert sum(sizes.values()) == 120


def test_parts_are_disjoint_and_cover_each_domain(frame: pd.DataFrame) -> None:
    splits = split_domains(frame, SplitParams(), ROLES)
    for role, value in ROLES.items():
        parts = [set(splits[f"{role}_{p}"]["uid"]) for p in PARTS]
        assert sum(len(p) for p in parts) == len(set.union(*parts))
        assert set.union(*parts) == set(frame.loc[frame["domain"] == value, "uid"])
        for part in PARTS:
            assert (splits[f"{role}_{part}"]["domain"] == value).all()


def test_parts_are_stratified(frame: pd.DataFrame) -> None:
    splits = split_domains(frame, SplitParams(), ROLES)
    for name, part in splits.items():
        counts = part["label"].value_counts()
        assert sorted(counts.index) == [0, 1, 2], name
        assert counts.max() - counts.min() <= 1, name


def test_rows_keep_their_values(frame: pd.DataFrame) -> None:
    splits = split_domains(frame, SplitParams(), ROLES)
    part = splits["target_val"]
    original = frame.set_index("uid").loc[part["uid"]].reset_index()
    pd.testing.assert_frame_equal(part[original.columns], original)
    assert isinstance(part.index, pd.RangeIndex)


def test_split_is_seeded(frame: pd.DataFrame) -> None:
    first = split_domains(frame, SplitParams(seed=5), ROLES)
    again = split_domains(frame, SplitParams(seed=5), ROLES)
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    other = split_domains(frame, SplitParams(seed=6), ROLES)
    assert set(other["base_test"]["uid"]) != set(first["base_test"]["uid"])


def test_split_does_not_depend_on_the_other_domain(frame: pd.DataFrame) -> None:
    both = split_domains(frame, SplitParams(), ROLES)
    base_only = split_domains(frame[frame["domain"] == "base"], SplitParams(), {"base": "base"})
    for part in PARTS:
        pd.testing.assert_frame_equal(both[f"base_{part}"], base_only[f"base_{part}"])


def test_other_sizes(frame: pd.DataFrame) -> None:
    params = SplitParams(test_size=0.5, val_size=0.25)
    parts = split_frame(frame[frame["domain"] == "base"], params, "base")
    assert {p: len(v) for p, v in parts.items()} == _expected_sizes(120, params)
    assert {p: len(v) for p, v in parts.items()} == {"train": 30, "val": 30, "test": 60}


def test_missing_domain_is_a_data_error(frame: pd.DataFrame) -> None:
    roles = {"base": "base", "target": "scanner-2"}
    with pytest.raises(
        DataError, match=r"no rows with domain == 'scanner-2' \(data\.target_domain\)"
    ):
        split_domains(frame, SplitParams(), roles)


def test_too_few_rows_to_stratify_is_one_line(frame: pd.DataFrame) -> None:
    small = frame[frame["domain"] == "target"].groupby("label").head(2)
    small = pd.concat([small, frame[(frame["domain"] == "target")].iloc[:1]])
    with pytest.raises(DataError) as caught:
        split_domains(small, SplitParams(), {"target": "target"})
    message = str(caught.value)
    assert message.startswith("split: cannot stratify the target domain (7 rows; smallest class")
    assert "\n" not in message


def test_too_few_rows_message_names_the_class_plainly(frame: pd.DataFrame) -> None:
    small = frame[frame["domain"] == "base"].groupby("label").head(2)
    with pytest.raises(DataError, match=r"smallest class 0 has 2 rows"):
        split_domains(small, SplitParams(), {"base": "base"})


def test_split_paths() -> None:
    assert layout.split_path("base", "train") == Path("data/splits/base_train.parquet")
    assert layout.split_path("target", "test") == layout.SPLITS / "target_test.parquet"


def test_clean_splits_do_not_leak(frame: pd.DataFrame) -> None:
    splits = split_domains(frame, SplitParams(), ROLES)
    check_leakage(splits, ["f0", "f1", "f2", "f3"], ROLES)


def test_a_row_in_train_and_test_is_a_leak(frame: pd.DataFrame) -> None:
    splits = split_domains(frame, SplitParams(), ROLES)
    features = ["f0", "f1", "f2", "f3"]
    leaked = splits["target_test"].copy()
    leaked.loc[[0, 1], features] = splits["target_train"].loc[[3, 3], features].to_numpy()
    splits["target_test"] = leaked
    with pytest.raises(DataError) as caught:
        check_leakage(splits, features, ROLES)
    assert str(caught.value) == (
        "split: 1 feature rows of domain 'target' are in both train and test; validate "
        "removes duplicates before the split: keep expect_multicolumn_rows_to_be_unique "
        "in validate.suite"
    )


def test_the_same_row_in_two_domains_is_not_a_leak(frame: pd.DataFrame) -> None:
    splits = split_domains(frame, SplitParams(), ROLES)
    features = ["f0", "f1", "f2", "f3"]
    splits["base_test"].loc[0, features] = splits["target_train"].loc[0, features].to_numpy()
    check_leakage(splits, features, ROLES)


def test_shared_feature_rows_compares_values_not_only_hashes() -> None:
    first = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0.0, 0.0, 1.0]})
    second = pd.DataFrame({"a": [3.0, 2.0, 9.0], "b": [1.0, 5.0, 0.0]})
    shared = shared_feature_rows(first, second, ["a", "b"])
    assert shared.to_dict("list") == {"a": [3.0], "b": [1.0]}
