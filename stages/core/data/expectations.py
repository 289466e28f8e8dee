"""The data gate: a Great Expectations suite (from params or a committed JSON file) checks the
raw table; our code turns GX's results into decisions.

Table-level checks (columns present, at least one row, numeric features) stop the stage.
Row-level checks quarantine the row with every reason it fails: a missing value, a feature
that is infinite or outside ``validate.feature_range``, an unknown domain or class, an exact
duplicate of an earlier row (the first copy is kept), identical features with conflicting
labels (every copy goes). Nothing is lost: rows_in == rows_clean + rows_quarantined, and a
quarantined row keeps every original column.

A text dataset (columns text, label, domain) has its own suite: a text that is missing or
blank, not valid UTF-8 (U+FFFD from ingest), of a length outside ``validate.text_length``,
an exact copy of an earlier text after whitespace and case normalization (the first stays) or
the same normalized text with another label (every copy goes) quarantines the row."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stages.core.common.data_params import ValidateParams
from stages.core.common.errors import DataError, one_line
from stages.core.common.layout import RAW, REJECTED
from stages.core.common.numbers import number_like, plain
from stages.core.common.schema import DOMAIN, LABEL
from stages.core.common.telemetry import silence
from stages.core.data.suites import (
    IN_SET,
    LENGTHS,
    NOT_BLANK,
    NOT_NULL,
    SUITE_NAME,
    TEXT_DUPLICATES,
    VALID_UTF8,
    params_suite,
    sort_key,
    text_params_suite,
    to_gx,
    with_required_checks,
)
from stages.core.data.text import first_invalid, normalized

REASON = "reason"


RAW_ROW = "raw_row"  # the row's position in data/raw/dataset.parquet (0-based)


# Table-level expectation types: a failure stops the stage (row-level ones quarantine rows).
# The order is the order of root causes: missing columns, no rows, a non-numeric column.
TABLE_LEVEL = {
    "expect_table_columns_to_match_set": 0,
    "expect_column_to_exist": 0,
    "expect_table_row_count_to_be_between": 1,
    "expect_multicolumn_values_to_be_numeric": 2,
    "expect_column_values_to_be_in_type_list": 2,
}


NUMERIC = {"expect_multicolumn_values_to_be_numeric", "expect_column_values_to_be_in_type_list"}


# Failing rows of these are copies of each other: the gate decides which to keep.
DUPLICATES = {
    "expect_multicolumn_rows_to_be_unique",
    "expect_compound_columns_to_be_unique",
    "expect_column_values_to_be_unique",
}


BETWEEN = {"expect_column_values_to_be_between", "expect_multicolumn_values_to_be_between"}


# GX's COMPLETE format lists every failing row's index (the only format that lists them all);
# the failing values, their partial lists and the pandas "query" it can add are not used.
RESULT_FORMAT = {
    "result_format": "COMPLETE",
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,
    "return_unexpected_index_query": False,
}


@dataclass(frozen=True)
class GateResult:
    clean: pd.DataFrame
    rejected: pd.DataFrame
    report: dict
    expectations: list[dict] = field(default_factory=list)  # one summary per expectation


def run_suite(frame: pd.DataFrame, suite: list[dict], name: str = SUITE_NAME):
    """Validate ``frame`` with GX on an ephemeral context; returns GX's validation result."""
    silence()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("pipeline")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all rows")
    )
    gx_suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=to_gx(suite)))
    # One batch load: Batch.validate() would load the frame a second time.
    validation = gx.ValidationDefinition(name=name, data=batch_definition, suite=gx_suite)
    # GX fingerprints every pandas batch under HASH_THRESHOLD bytes (1 GB) with a hash of the
    # whole table, a batch marker nothing here reads: 1.6 s at 1,000,000 x 64. Skip it.
    threshold = pandas_execution_engine.HASH_THRESHOLD
    pandas_execution_engine.HASH_THRESHOLD = 0
    try:
        return validation.run(batch_parameters={"dataframe": frame}, result_format=RESULT_FORMAT)
    finally:
        pandas_execution_engine.HASH_THRESHOLD = threshold


def _column(kwargs: dict) -> str:
    if "column" in kwargs:
        return str(kwargs["column"])
    if "column_set" in kwargs:
        return f"{len(kwargs['column_set'])} columns"
    columns = [str(c) for c in kwargs.get("column_list", [])]
    return ", ".join(columns) if len(columns) <= 3 else f"{len(columns)} feature columns"


def _table_failure(kind: str, kwargs: dict, outcome: dict, frame: pd.DataFrame) -> str:
    if kind == "expect_table_row_count_to_be_between":
        observed, least = outcome.get("observed_value"), kwargs.get("min_value")
        return f"{observed} rows, expected at least {least}"
    if kind in NUMERIC:
        for column in kwargs.get("column_list") or [kwargs["column"]]:
            bad = ~number_like(frame[column])
            if bad.any():
                first = int(np.argmax(bad))
                return (
                    f"column '{column}' is not numeric: {int(bad.sum())} values are not numbers "
                    f"(first {frame[column].iloc[first]!r} in row {first}); fix them in the "
                    "source or drop the column from data.features"
                )
            if not pd.api.types.is_numeric_dtype(frame[column]):
                return f"column '{column}' is not numeric ({frame[column].dtype})"
    return f"{kind} failed on {_column(kwargs) or 'the table'}"


def _missing_columns(kind: str, kwargs: dict, outcome: dict) -> list[str]:
    if kind == "expect_column_to_exist":
        return [kwargs["column"]]
    return list(((outcome.get("details") or {}).get("mismatched") or {}).get("missing") or [])


def _row_reasons(
    kind: str, kwargs: dict, frame: pd.DataFrame, rows: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Why each of ``rows`` fails one expectation, naming the column and the value:
    (row of each reason, reasons); a row failing in several columns gets several reasons."""
    columns = kwargs.get("column_list") or [kwargs.get("column")]
    if kind in NOT_NULL:
        missing = frame[columns].iloc[rows].isna().to_numpy()
        at, col = np.nonzero(missing)
        return rows[at], [f"{columns[c]} is missing" for c in col]
    if kind in BETWEEN and all(pd.api.types.is_numeric_dtype(frame[c]) for c in columns):
        values = frame[columns].to_numpy(np.float64)[rows]
        low = np.broadcast_to(_limits(kwargs.get("min_value"), -np.inf), (len(columns),))
        high = np.broadcast_to(_limits(kwargs.get("max_value"), np.inf), (len(columns),))
        at, col = np.nonzero(~np.isnan(values) & ((values < low) | (values > high)))
        reasons = []
        for r, c in zip(at.tolist(), col.tolist(), strict=True):
            value = values[r, c]
            reasons.append(
                f"{columns[c]} = {value:g} outside [{_bound(low[c])}, {_bound(high[c])}]"
                if np.isfinite(value)
                else f"{columns[c]} is {value}"
            )
        return rows[at], reasons
    if kind == NOT_BLANK:
        return rows, [f"{columns[0]} is blank"] * len(rows)
    if kind == VALID_UTF8:
        values = frame[columns[0]].to_numpy()[rows]
        return rows, [
            f"{columns[0]} is not valid UTF-8 (U+FFFD or a lone surrogate at character "
            f"{first_invalid(value)})"
            for value in values
        ]
    if kind == LENGTHS:
        values = frame[columns[0]].to_numpy()[rows]
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        span = f"[{'0' if low is None else low}, {'inf' if high is None else high}]"
        return rows, [f"{columns[0]} has {len(v)} characters, outside {span}" for v in values]
    if kind == IN_SET:
        values = frame[columns[0]].to_numpy()[rows]
        allowed = list(kwargs.get("value_set", []))
        return rows, [f"{columns[0]} {plain(value)!r} not in {allowed}" for value in values]
    return rows, [f"{_column(kwargs)} fails {kind}"] * len(rows)


def _limits(value: Any, unbounded: float) -> np.ndarray:
    return np.asarray(unbounded if value is None else value, dtype=np.float64)


def _bound(value: float) -> str:
    return f"{value:g}" if abs(value) < sys.float_info.max else ("-inf" if value < 0 else "inf")


def _duplicate_reasons(
    frame: pd.DataFrame, columns: list[str], rows: np.ndarray
) -> tuple[dict[int, str], int, int]:
    """Decide among rows whose features occur more than once (GX's uniqueness result).

    Identical features with conflicting labels quarantine every copy; otherwise an exact
    copy (every column equal) of an earlier row goes and the first stays. Rows GX flagged
    whose features turn out distinct (a hash collision) stay. Returns (row -> reason,
    duplicates, conflicts).
    """
    if len(rows) == 0:
        return {}, 0, 0
    copies = frame.iloc[rows]
    same_features = copies.groupby(columns, dropna=False, sort=False).ngroup().to_numpy()
    labels = copies[LABEL].groupby(same_features).nunique()  # missing labels do not count
    conflicting = np.isin(same_features, labels.index[labels.to_numpy() > 1])
    reasons: dict[int, str] = {}
    for group in np.unique(same_features[conflicting]):
        members = rows[same_features == group].tolist()
        for row in members:
            others = [r for r in members if r != row]
            reasons[row] = f"features identical to row {_rows(others)} with another label"
    exact = copies.groupby(list(copies.columns), dropna=False, sort=False).ngroup().to_numpy()
    first = pd.Series(rows).groupby(exact).transform("min").to_numpy()
    repeated = ~conflicting & (rows != first)
    for row, original in zip(rows[repeated].tolist(), first[repeated].tolist(), strict=True):
        reasons[row] = f"duplicate of row {original}"
    return reasons, int(repeated.sum()), int(conflicting.sum())


def _text_duplicate_reasons(
    frame: pd.DataFrame, column: str, rows: np.ndarray, failing: np.ndarray
) -> tuple[dict[int, str], int, int]:
    """Decide among texts that occur more than once after normalization (in any domain):
    with conflicting labels every copy goes; otherwise every copy but one goes, the first
    that no other check quarantines (``failing``: a blank domain or a stray space in the first
    copy must not cost the text its valid copy), else the first. Returns (row -> reason,
    duplicates, conflicts)."""
    if len(rows) == 0:
        return {}, 0, 0
    copies = pd.DataFrame(
        {"text": normalized(frame[column].iloc[rows]).to_numpy(), "label": frame[LABEL].iloc[rows]}
    )
    same_text = copies.groupby("text", sort=False).ngroup().to_numpy()
    labels = copies["label"].groupby(same_text).nunique()  # missing labels do not count
    conflicting = np.isin(same_text, labels.index[labels.to_numpy() > 1])
    reasons: dict[int, str] = {}
    for group in np.unique(same_text[conflicting]):
        members = rows[same_text == group].tolist()
        for row in members:
            others = [r for r in members if r != row]
            reasons[row] = f"{column} (normalized) equal to row {_rows(others)} with another label"
    exact = copies.groupby(["text", "label"], dropna=False, sort=False).ngroup().to_numpy()
    # Failing rows rank after passing ones: the first passing copy of a group stays.
    rank = pd.Series(np.where(np.isin(rows, failing), rows + len(frame), rows))
    first = rank.groupby(exact).transform("min").to_numpy() % len(frame)
    repeated = ~conflicting & (rows != first)
    for row, original in zip(rows[repeated].tolist(), first[repeated].tolist(), strict=True):
        reasons[row] = f"{column} (normalized) duplicate of row {original}"
    return reasons, int(repeated.sum()), int(conflicting.sum())


def _rows(rows: list[int], limit: int = 3) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _raised(info: dict) -> str | None:
    """GX's exception message for an expectation that could not run, else None; GX nests
    metric errors one level down, keyed by metric."""
    for entry in [info, *(v for v in info.values() if isinstance(v, dict))]:
        if entry.get("raised_exception"):
            return one_line(str(entry.get("exception_message", ""))) or "error"
    return None


def short_classes(
    clean: pd.DataFrame, min_rows: int, domains: list[str], classes: list | None = None
) -> pd.Series:
    """Clean-row counts of the (domain, class) pairs with fewer than ``min_rows`` rows.

    ``classes`` are the classes of the raw table, so that a class that lost every row to the
    quarantine counts 0; a domain in ``domains`` with no clean rows counts 0 for every class.
    """
    if classes is None:
        classes = sorted(clean[LABEL].unique())
    index = pd.MultiIndex.from_product([domains, classes], names=[DOMAIN, LABEL])
    counts = clean.groupby([DOMAIN, LABEL]).size().reindex(index, fill_value=0)
    return counts[counts < min_rows]


def restore_integer_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer labels that a missing value turned into floats become integers again."""
    labels = frame[LABEL]
    if pd.api.types.is_float_dtype(labels) and labels.notna().all() and (labels % 1 == 0).all():
        frame = frame.assign(**{LABEL: labels.astype("int64")})
    return frame


def gate(
    frame: pd.DataFrame,
    features: list[str],
    params: ValidateParams,
    domains: list[str],
    suite: list[dict] | None = None,
    text: bool = False,
) -> GateResult:
    """Validate the raw table with ``suite`` (default: built from params; the text suite when
    ``text``); quarantine failing rows, then check the quarantined share and the clean rows
    per class and domain. Rows without a label or a domain are quarantined even when
    ``suite`` has no check for them (``with_required_checks``).

    A table-level failure raises DataError. The dataset-level gates are listed in
    ``report["failures"]``, so that the caller can write every output before it stops.
    """
    frame = frame.reset_index(drop=True)
    if suite is None:
        suite = (
            text_params_suite(params, domains) if text else params_suite(features, params, domains)
        )
    suite = with_required_checks(suite)
    result = run_suite(frame, suite)
    missing_columns: list[str] = []
    table_failures: list[tuple[int, str]] = []
    summaries: list[dict] = []
    reason_rows: list[np.ndarray] = []
    reason_texts: list[str] = []
    failing_rows: dict[str, set[int]] = defaultdict(set)
    duplicates = conflicts = 0
    unknown_classes: set = set()  # labels the suite rejects are not classes of the dataset
    text_copies: list[tuple[str, np.ndarray, dict]] = []
    for item in result.results:
        config = item.expectation_config
        kind, kwargs = config.type, dict(config.kwargs)
        outcome = item.result or {}
        rows = np.asarray(outcome.get("unexpected_index_list") or [], dtype=np.int64)
        row_level = kind not in TABLE_LEVEL and "unexpected_index_list" in outcome
        summary = {
            "type": kind,
            "column": _column(kwargs),
            "level": "row" if row_level else "table",
            "success": bool(item.success),
            "failing_rows": len(rows),
        }
        summaries.append(summary)
        error = _raised(item.exception_info or {})
        if error is not None:
            summary["level"] = "table"
            table_failures.append(
                (9, f"the suite's {kind} on {_column(kwargs)} could not run ({error})")
            )
        elif not row_level:
            if not item.success:
                missing_columns += _missing_columns(kind, kwargs, outcome)
                rank = TABLE_LEVEL.get(kind, 8)
                table_failures.append((rank, _table_failure(kind, kwargs, outcome, frame)))
        elif kind in DUPLICATES:
            columns = kwargs.get("column_list") or [kwargs["column"]]
            found, repeated, conflicting = _duplicate_reasons(frame, columns, rows)
            reason_rows.append(np.fromiter(found, dtype=np.int64, count=len(found)))
            reason_texts += found.values()
            duplicates += repeated
            conflicts += conflicting
            summary["failing_rows"] = len(found)
        elif kind == TEXT_DUPLICATES:
            # Decided after the other checks: the copy kept is the first one that passes them.
            text_copies.append((kwargs["column"], rows, summary))
        else:
            at, texts = _row_reasons(kind, kwargs, frame, rows)
            reason_rows.append(at)
            reason_texts += texts
            failing_rows[_check_name(kind, kwargs)].update(rows.tolist())
            if kind == IN_SET and kwargs.get("column") == LABEL:
                unknown_classes.update(plain(v) for v in frame[LABEL].to_numpy()[rows])
    for column, rows, summary in text_copies:
        failing = np.unique(np.concatenate([np.empty(0, dtype=np.int64), *reason_rows]))
        found, repeated, conflicting = _text_duplicate_reasons(frame, column, rows, failing)
        reason_rows.append(np.fromiter(found, dtype=np.int64, count=len(found)))
        reason_texts += found.values()
        duplicates += repeated
        conflicts += conflicting
        summary["failing_rows"] = len(found)
    if missing_columns:
        raise DataError(
            f"{RAW}: missing columns {sorted(set(missing_columns), key=missing_columns.index)} "
            + ("(text, label, domain)" if text else "(data.features, label, domain)")
        )
    if table_failures:
        first = min(table_failures)[1]
        more = len(table_failures) - 1
        raise DataError(f"{RAW}: {first}" + (f" (and {more} more table checks)" if more else ""))

    if text:
        checks = {"missing_columns": 0, "not_null": 0, "blank_text": 0, "invalid_utf8": 0}
        checks |= {"text_length": 0, "known_domain": 0}
    else:
        checks = {"missing_columns": 0, "not_null": 0, "in_range": 0, "known_domain": 0}
    checks |= {name: len(rows) for name, rows in failing_rows.items()}
    checks |= {"duplicate": duplicates, "conflicting_label": conflicts}
    clean, rejected = quarantine(frame, reason_rows, reason_texts)

    rows_in = len(frame)
    fraction = len(rejected) / rows_in if rows_in else 1.0
    failures = []
    if fraction > params.max_quarantine_fraction:
        failures.append(
            f"validate.max_quarantine_fraction: {len(rejected)} of {rows_in} rows "
            f"({fraction:.1%}) quarantined, more than {params.max_quarantine_fraction:.1%}; "
            f"see {REJECTED}"
        )
    labels = (plain(v) for v in frame[LABEL].dropna().unique())
    classes = sorted((c for c in labels if c not in unknown_classes), key=sort_key)
    short = short_classes(clean, params.min_rows_per_class, domains, classes)
    if not short.empty:
        (domain, label), count = next(iter(short.items()))
        failures.append(
            f"validate.min_rows_per_class: class {plain(label)!r} has {count} clean rows in domain "
            f"{domain!r} (< {params.min_rows_per_class}); {len(short)} (domain, class) pairs short"
        )
    checks["short_classes"] = len(short)
    report = {
        "rows_in": rows_in,
        "rows_clean": len(clean),
        "rows_quarantined": len(rejected),
        "quarantine_fraction": round(fraction, 6),
        "checks": checks,
        "passed": not failures,
        "failures": failures,
    }
    return GateResult(clean=clean, rejected=rejected, report=report, expectations=summaries)


def _check_name(kind: str, kwargs: dict) -> str:
    if kind in NOT_NULL:
        return "not_null"
    if kind in BETWEEN:
        return "in_range"
    if kind == NOT_BLANK:
        return "blank_text"
    if kind == VALID_UTF8:
        return "invalid_utf8"
    if kind == LENGTHS:
        return "text_length"
    if kind == IN_SET and kwargs.get("column") == DOMAIN:
        return "known_domain"
    if kind == IN_SET and kwargs.get("column") == LABEL:
        return "known_label"
    return kind.removeprefix("expect_")


def quarantine(
    frame: pd.DataFrame, reason_rows: list[np.ndarray], reason_texts: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``frame`` into clean rows and rejected rows; a rejected row keeps every column
    and gains ``reason`` (its reasons joined by "; ", in suite order) and ``raw_row``."""
    rows = np.concatenate([np.empty(0, dtype=np.int64), *reason_rows])
    order = np.argsort(rows, kind="stable")  # by row; a row's reasons keep the suite's order
    rows, texts = rows[order], [reason_texts[i] for i in order]
    bad, starts = np.unique(rows, return_index=True)
    ends = [*starts[1:].tolist(), len(texts)] if len(starts) else []
    joined = ["; ".join(texts[a:b]) for a, b in zip(starts.tolist(), ends, strict=True)]
    keep = np.ones(len(frame), dtype=bool)
    keep[bad] = False
    rejected = frame.iloc[bad].reset_index(drop=True)
    rejected[REASON] = pd.Series(joined, dtype=object)
    rejected[RAW_ROW] = bad
    clean = restore_integer_labels(frame[keep].reset_index(drop=True))
    return clean, rejected
