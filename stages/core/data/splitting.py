"""Split: stratified, seeded train/val/test inside each domain; the leakage checks (feature rows,
or normalized texts, in two parts)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.core.common.data_params import SplitParams
from stages.core.common.errors import DataError
from stages.core.common.numbers import plain
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.data.text import normalized

PARTS = ("train", "val", "test")


def split_frame(frame: pd.DataFrame, params: SplitParams, where: str) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test parts of ``frame``; ``where`` names it in errors."""
    from sklearn.model_selection import train_test_split

    try:
        rest, test = train_test_split(
            frame, test_size=params.test_size, stratify=frame[LABEL], random_state=params.seed
        )
        val_share = params.val_size / (1 - params.test_size)
        train, val = train_test_split(
            rest, test_size=val_share, stratify=rest[LABEL], random_state=params.seed
        )
    except ValueError as exc:
        counts = frame[LABEL].value_counts().sort_values()
        raise DataError(
            f"split: cannot stratify the {where} domain ({len(frame)} rows; "
            f"smallest class {plain(counts.index[0])!r} has {counts.iloc[0]} rows): {exc}; "
            "add rows to the small classes or raise validate.min_rows_per_class to stop earlier"
        ) from None
    return {"train": train, "val": val, "test": test}


def split_domains(
    frame: pd.DataFrame, params: SplitParams, domains: dict[str, str]
) -> dict[str, pd.DataFrame]:
    """Split each domain; keys are ``<role>_<part>`` (``base_train`` ... ``target_test``).

    ``domains`` maps a role (``base``, ``target``) to its value in the ``domain`` column.
    """
    splits = {}
    for role, value in domains.items():
        rows = frame[frame[DOMAIN] == value]
        if rows.empty:
            raise DataError(f"split: no rows with domain == {value!r} (data.{role}_domain)")
        for part, piece in split_frame(rows, params, value).items():
            splits[f"{role}_{part}"] = piece.reset_index(drop=True)
    return splits


def shared_feature_rows(
    first: pd.DataFrame, second: pd.DataFrame, features: list[str]
) -> pd.DataFrame:
    """The feature rows that occur in both frames (each once), found by a 64-bit row hash
    and confirmed by comparing the values."""
    hashes_first = pd.util.hash_pandas_object(first[features], index=False).to_numpy()
    hashes_second = pd.util.hash_pandas_object(second[features], index=False).to_numpy()
    common = np.intersect1d(hashes_first, hashes_second)
    if common.size == 0:
        return first.iloc[:0][features]
    left = first.loc[np.isin(hashes_first, common), features].drop_duplicates()
    right = second.loc[np.isin(hashes_second, common), features].drop_duplicates()
    return left.merge(right, on=features, how="inner")


def check_leakage(
    splits: dict[str, pd.DataFrame], features: list[str], domains: dict[str, str]
) -> None:
    """Raise DataError when a feature row of a domain is in two of its parts (train, val,
    test): the model would be scored on rows it trained on."""
    for role, value in domains.items():
        for i, part in enumerate(PARTS):
            for other in PARTS[i + 1 :]:
                shared = shared_feature_rows(
                    splits[f"{role}_{part}"], splits[f"{role}_{other}"], features
                )
                if len(shared):
                    raise DataError(
                        f"split: {len(shared)} feature rows of domain {value!r} are in both "
                        f"{part} and {other}; validate removes duplicates before the split: "
                        "keep expect_multicolumn_rows_to_be_unique in validate.suite"
                    )


def check_text_leakage(splits: dict[str, pd.DataFrame], domains: dict[str, str]) -> None:
    """Raise DataError when a normalized text (whitespace runs as one space, stripped,
    case-folded) is in two parts of the domains' splits, within a domain or across them:
    validate removed every copy, in any domain, before the split."""
    names = [f"{role}_{part}" for role in domains for part in PARTS]
    texts = {name: set(normalized(splits[name][TEXT]).dropna()) for name in names}
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            shared = texts[name] & texts[other]
            if shared:
                example = min(shared)
                raise DataError(
                    f"split: {len(shared)} texts (normalized) are in both {name} and {other} "
                    f"(e.g. {example[:60]!r}); validate removes copies before the split: keep "
                    "expect_column_normalized_values_to_be_unique in validate.suite"
                )


def mirror_single_domain(splits: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """A one-domain dataset's splits under both roles: ``target_<part>`` holds the same rows
    as ``base_<part>``, so that finetune trains on its train split and evaluate scores its
    test split through the usual files."""
    return splits | {f"target_{part}": splits[f"base_{part}"] for part in PARTS}
