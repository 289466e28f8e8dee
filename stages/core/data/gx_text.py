"""Great Expectations expectations for a text column: not blank, valid UTF-8, unique after
normalization. GX's own ``expect_column_value_lengths_to_be_between`` checks the lengths.

Like every column map expectation, they skip missing values (the null check reports those).
Importing this module registers them with GX (it imports great_expectations: import it lazily)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics import (
    ColumnMapMetricProvider,
    column_condition_partial,
)

from stages.core.data.text import first_invalid, is_blank, normalized


def invalid_utf8(texts: pd.Series) -> np.ndarray:
    """Per text: holds U+FFFD (what ingest makes of a byte that is not UTF-8) or a lone
    surrogate (a table built without ingest)."""
    return np.fromiter(
        (isinstance(v, str) and first_invalid(v) >= 0 for v in texts), dtype=bool, count=len(texts)
    )


class ColumnValuesNotBlank(ColumnMapMetricProvider):
    condition_metric_name = "column_values.not_blank"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs) -> pd.Series:
        return pd.Series(~is_blank(column), index=column.index)


class ColumnValuesValidUtf8(ColumnMapMetricProvider):
    condition_metric_name = "column_values.valid_utf8"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs) -> pd.Series:
        return pd.Series(~invalid_utf8(column), index=column.index)


class ColumnNormalizedValuesUnique(ColumnMapMetricProvider):
    condition_metric_name = "column_values.normalized_unique"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs) -> pd.Series:
        return ~normalized(column).duplicated(keep=False)


class ExpectColumnValuesToNotBeBlank(ColumnMapExpectation):
    """No text is empty or only whitespace."""

    map_metric = "column_values.not_blank"


class ExpectColumnValuesToBeValidUtf8(ColumnMapExpectation):
    """No text holds U+FFFD or a lone surrogate: every text decoded from valid UTF-8."""

    map_metric = "column_values.valid_utf8"


class ExpectColumnNormalizedValuesToBeUnique(ColumnMapExpectation):
    """No two texts are equal after whitespace and case normalization (every copy is
    unexpected; the gate keeps the first of copies with one label)."""

    map_metric = "column_values.normalized_unique"
