"""Data-gate suites as plain data: built from params, inferred from a table for the user to
review and commit, written and read as GX's JSON layout, and turned into GX expectations
(stages/core/data/expectations.py runs them and turns the results into decisions). A text
dataset (columns text, label, domain) has a suite of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.common.data_params import ValidateParams
from stages.core.common.errors import DataError, one_line
from stages.core.common.layout import RAW
from stages.core.common.numbers import plain
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.common.telemetry import silence

NUMERIC_TYPES = [
    "float64",
    "float32",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
]

# Text copies after normalization (stages/core/data/gx_text.py): the gate decides which to keep.
TEXT_DUPLICATES = "expect_column_normalized_values_to_be_unique"

NOT_BLANK = "expect_column_values_to_not_be_blank"

VALID_UTF8 = "expect_column_values_to_be_valid_utf8"

LENGTHS = "expect_column_value_lengths_to_be_between"

NOT_NULL_COLUMN = "expect_column_values_to_not_be_null"

NOT_NULL = {NOT_NULL_COLUMN, "expect_multicolumn_values_to_not_be_null"}

IN_SET = "expect_column_values_to_be_in_set"

# Columns no row can go on without, whatever the suite says: split and training need every
# row's label and domain (a hand-edited suite without these checks let NaN labels through).
REQUIRED = (LABEL, DOMAIN)

SUITE_NAME = "raw"


def expectation(kind: str, **kwargs: Any) -> dict:
    """One expectation as plain data: ``{"type": "expect_...", "kwargs": {...}}``."""
    return {"type": kind, "kwargs": kwargs}


def _feature_checks(features: list[str], low: Any, high: Any) -> list[dict]:
    """Numeric, not null, in range, unique rows: one multicolumn expectation each over the
    feature block (stages/core/data/gx_multicolumn.py), or GX's column checks for one feature."""
    if len(features) == 1:
        (column,) = features
        return [
            expectation(
                "expect_column_values_to_be_in_type_list", column=column, type_list=NUMERIC_TYPES
            ),
            expectation("expect_column_values_to_not_be_null", column=column),
            expectation(
                "expect_column_values_to_be_between", column=column, min_value=low, max_value=high
            ),
            expectation("expect_column_values_to_be_unique", column=column),
        ]
    columns = list(features)
    return [
        expectation("expect_multicolumn_values_to_be_numeric", column_list=columns),
        expectation("expect_multicolumn_values_to_not_be_null", column_list=columns),
        expectation(
            "expect_multicolumn_values_to_be_between",
            column_list=columns,
            min_value=low,
            max_value=high,
        ),
        expectation("expect_multicolumn_rows_to_be_unique", column_list=columns),
    ]


def _suite(features: list[str], low: Any, high: Any, value_sets: dict[str, list]) -> list[dict]:
    suite = [
        expectation(
            "expect_table_columns_to_match_set",
            column_set=[*features, LABEL, DOMAIN],
            exact_match=False,
        ),
        expectation("expect_table_row_count_to_be_between", min_value=1),
        expectation("expect_column_values_to_not_be_null", column=LABEL),
        expectation("expect_column_values_to_not_be_null", column=DOMAIN),
    ]
    suite += _feature_checks(features, low, high)
    suite += [
        expectation(IN_SET, column=column, value_set=values)
        for column, values in value_sets.items()
    ]
    return suite


def with_required_checks(suite: list[dict]) -> list[dict]:
    """``suite`` plus a not-null check for each column of ``REQUIRED`` that none of its
    not-null checks covers (one with a ``row_condition`` covers only some rows)."""
    covered = set()
    for item in suite:
        kwargs = item["kwargs"]
        if item["type"] in NOT_NULL and not kwargs.get("row_condition"):
            covered.update(kwargs.get("column_list") or [kwargs.get("column")])
    missing = [column for column in REQUIRED if column not in covered]
    return [*suite, *(expectation(NOT_NULL_COLUMN, column=column) for column in missing)]


def params_suite(features: list[str], params: ValidateParams, domains: list[str]) -> list[dict]:
    """The suite built from params: columns present, at least one row, numeric features,
    nothing missing, features finite and inside ``feature_range``, domain one of ``domains``,
    no two rows with identical features."""
    # Finite bounds also reject +/-inf.
    low, high = params.feature_range or (-sys.float_info.max, sys.float_info.max)
    return _suite(features, float(low), float(high), {DOMAIN: list(domains)})


def infer_suite(frame: pd.DataFrame, features: list[str], domains: list[str]) -> list[dict]:
    """A suite inferred from the data, for the user to review and commit: each feature
    between its observed finite minimum and maximum, the label one of the observed classes,
    the domain one of ``domains``, plus the structural and duplicate checks."""
    values = frame[features].to_numpy(np.float64)
    finite = np.where(np.isfinite(values), values, np.nan)
    empty = np.isnan(finite).all(axis=0)
    if empty.any():
        column = features[int(np.argmax(empty))]
        raise DataError(f"{RAW}: column '{column}' has no finite values to infer a range from")
    lows = np.nanmin(finite, axis=0).tolist()
    highs = np.nanmax(finite, axis=0).tolist()
    if len(features) == 1:
        lows, highs = lows[0], highs[0]
    classes = sorted((plain(v) for v in frame[LABEL].dropna().unique()), key=sort_key)
    return _suite(features, lows, highs, {LABEL: classes, DOMAIN: list(domains)})


def _text_suite(low: int, high: int, value_sets: dict[str, list]) -> list[dict]:
    return [
        expectation(
            "expect_table_columns_to_match_set", column_set=[TEXT, LABEL, DOMAIN], exact_match=False
        ),
        expectation("expect_table_row_count_to_be_between", min_value=1),
        expectation("expect_column_values_to_not_be_null", column=TEXT),
        expectation("expect_column_values_to_not_be_null", column=LABEL),
        expectation("expect_column_values_to_not_be_null", column=DOMAIN),
        expectation(NOT_BLANK, column=TEXT),
        expectation(VALID_UTF8, column=TEXT),
        expectation(LENGTHS, column=TEXT, min_value=low, max_value=high),
        expectation(TEXT_DUPLICATES, column=TEXT),
        *(
            expectation(IN_SET, column=column, value_set=values)
            for column, values in value_sets.items()
        ),
    ]


def text_params_suite(params: ValidateParams, domains: list[str]) -> list[dict]:
    """The text suite built from params: columns present, at least one row, nothing missing,
    no blank text, valid UTF-8, lengths inside ``validate.text_length``, no two texts equal
    after normalization, domain one of ``domains``."""
    low, high = params.text_length
    return _text_suite(int(low), int(high), {DOMAIN: list(domains)})


def infer_text_suite(frame: pd.DataFrame, domains: list[str]) -> list[dict]:
    """A text suite inferred from the data: lengths between the observed shortest and
    longest text, the label one of the observed classes, the domain one of ``domains``."""
    texts = frame[TEXT].dropna()
    if texts.empty:
        raise DataError(f"{RAW}: column '{TEXT}' has no texts to infer lengths from")
    sizes = texts.map(len)
    classes = sorted((plain(v) for v in frame[LABEL].dropna().unique()), key=sort_key)
    return _text_suite(int(sizes.min()), int(sizes.max()), {LABEL: classes, DOMAIN: list(domains)})


def sort_key(value: Any) -> tuple:
    return (isinstance(value, str), value)


def suite_json(suite: list[dict]) -> str:
    """The suite in GX's JSON layout (name, expectations of type and kwargs), one kwarg per
    line so that a reviewer reads and diffs it line by line; equal suites give equal bytes."""
    blocks = []
    for item in suite:
        kwargs = ",\n".join(
            f"        {json.dumps(key)}: {json.dumps(value)}"
            for key, value in item["kwargs"].items()
        )
        blocks.append(
            f'    {{\n      "type": {json.dumps(item["type"])},\n'
            f'      "kwargs": {{\n{kwargs}\n      }}\n    }}'
        )
    body = ",\n".join(blocks)
    return f'{{\n  "name": {json.dumps(SUITE_NAME)},\n  "expectations": [\n{body}\n  ]\n}}\n'


def load_suite(path: Path | str) -> list[dict]:
    """Read a suite file written by ``suite_json`` (or by hand, or by GX); one line per error."""
    path = Path(path)
    where = f"validate.suite: {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{where}: file not found; write one with `python -m stages.validate "
            f"--infer-suite {path}` or set validate.suite: null"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    items = data.get("expectations") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: expected an object with a non-empty 'expectations' list")
    suite = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise DataError(f"{where}: expectation {number} has no 'type'")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise DataError(f"{where}: expectation {number}: 'kwargs' must be an object")
        suite.append({"type": item["type"], "kwargs": dict(kwargs)})
    to_gx(suite, where)  # fail now, naming the file, on an unknown type or bad kwargs
    return suite


def to_gx(suite: list[dict], where: str = "suite") -> list:
    silence()
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    import stages.core.data.gx_multicolumn  # noqa: F401 (registers the multicolumn expectations)
    import stages.core.data.gx_text  # noqa: F401 (registers the text expectations)

    built = []
    for number, item in enumerate(suite, start=1):
        try:
            built.append(ExpectationConfiguration(**item).to_domain_obj())
        except Exception as exc:  # GX raises many types for unknown types and bad kwargs
            raise DataError(
                f"{where}: expectation {number} ({item['type']}): {one_line(exc)}"
            ) from None
    return built
