"""Split: stratified, seeded train/val/test inside each domain."""

from __future__ import annotations

import pandas as pd

from stages.core.data import DOMAIN, LABEL, plain
from stages.core.errors import DataError
from stages.core.params import SplitParams

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
            f"smallest class {plain(counts.index[0])!r} has {counts.iloc[0]} rows): {exc}"
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
