"""Small value helpers shared by every concern."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas only where a column is checked: the training loop needs none
    import pandas as pd

DECIMALS = 6  # of every figure written to metrics/, reports/ and plots/: stable across reruns


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages read ``class 1``."""
    return value.item() if isinstance(value, np.generic) else value


def rounded(value: Any) -> Any:
    """A figure for an output file: floats (numpy's too) rounded to ``DECIMALS`` places, as a
    Python float; a Python int (an epoch, a count) stays an int, so that it reads ``3``, not
    ``3.0``."""
    return value if isinstance(value, int) else round(float(value), DECIMALS)


def number_like(column: pd.Series) -> np.ndarray:
    """Per value: a number, or missing (a missing value is the null check's business); text
    that pandas cannot read as a number (``"seven"``) is not. Numbers stored as text
    (``"3.5"``) are number-like, and so are booleans (0 and 1). Ingest and the data gate's
    numeric check share this one definition."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return np.ones(len(column), dtype=bool)
    return (pd.to_numeric(column, errors="coerce").notna() | column.isna()).to_numpy()
