"""The data gate: a Great Expectations suite (from params or a committed JSON file) checks the
raw table; our code turns GX's results into decisions.

Table-level checks (columns present, at least one row, numeric features) stop the stage.
Row-level checks quarantine the row with every reason it fails: a missing value, a feature
that is infinite or outside ``validate.feature_range``, an unknown domain or class, an exact
duplicate of an earlier row (the first copy is kept), identical features with conflicting
labels (every copy goes). Nothing is lost: rows_in == rows_clean + rows_quarantined, and a
quarantined row keeps every original column.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.data import DOMAIN, LABEL, plain
from stages.core.errors import DataError
from stages.core.layout import RAW, REJECTED
from stages.core.params import ValidateParams
from stages.core.telemetry import silence

REASON = "reason"
RAW_ROW = "raw_row"  # the row's position in data/raw/dataset.parquet (0-based)
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
# Table-level expectation types: a failure stops the stage (row-level ones quarantine rows).
TABLE_LEVEL = {
    "expect_column_to_exist",
    "expect_table_row_count_to_be_between",
    "expect_column_values_to_be_in_type_list",
}
TABLE_ORDER = {
    "expect_table_row_count_to_be_between": 0,
    "expect_column_values_to_be_in_type_list": 1,
}
DUPLICATES = "expect_compound_columns_to_be_unique"
# The report's name for each check (row-level counts are rows failing it; a row can fail several).
CHECK_NAMES = {
    "expect_column_values_to_not_be_null": "not_null",
    "expect_column_values_to_be_between": "in_range",
    "expect_column_values_to_be_in_set": "in_set",
}
SUITE_NAME = "raw"
# GX's COMPLETE format lists every failing row's index; the values, the partial lists and
# the pandas "query" it would add are not used (see benchmarks/validate.py).
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


def expectation(kind: str, **kwargs: Any) -> dict:
    """One expectation as plain data: ``{"type": "expect_...", "kwargs": {...}}``."""
    return {"type": kind, "kwargs": kwargs}


def _structure(features: list[str]) -> list[dict]:
    columns = [*features, LABEL, DOMAIN]
    suite = [expectation("expect_column_to_exist", column=c) for c in columns]
    suite.append(expectation("expect_table_row_count_to_be_between", min_value=1))
    suite += [
        expectation("expect_column_values_to_be_in_type_list", column=c, type_list=NUMERIC_TYPES)
        for c in features
    ]
    suite += [expectation("expect_column_values_to_not_be_null", column=c) for c in columns]
    return suite


def params_suite(features: list[str], params: ValidateParams, domains: list[str]) -> list[dict]:
    """The suite built from params: columns present, at least one row, numeric features,
    nothing missing, features finite and inside ``feature_range``, domain one of ``domains``,
    no two rows with identical features."""
    # Finite bounds also reject +/-inf.
    low, high = params.feature_range or (-sys.float_info.max, sys.float_info.max)
    suite = _structure(features)
    suite += [
        expectation("expect_column_values_to_be_between", column=c, min_value=low, max_value=high)
        for c in features
    ]
    suite.append(expectation("expect_column_values_to_be_in_set", column=DOMAIN, value_set=domains))
    suite.append(expectation(DUPLICATES, column_list=list(features)))
    return suite


def infer_suite(frame: pd.DataFrame, features: list[str], domains: list[str]) -> list[dict]:
    """A suite inferred from the data, for the user to review and commit: each feature
    between its observed finite minimum and maximum, the label one of the observed classes,
    the domain one of ``domains``, plus the structural and duplicate checks."""
    suite = _structure(features)
    values = frame[features].to_numpy(np.float64)
    finite = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(all="ignore"):
        lows, highs = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
    for column, low, high in zip(features, lows, highs, strict=True):
        if np.isnan(low):
            raise DataError(f"{RAW}: column '{column}' has no finite values to infer a range from")
        suite.append(
            expectation(
                "expect_column_values_to_be_between",
                column=column,
                min_value=float(low),
                max_value=float(high),
            )
        )
    classes = sorted((plain(v) for v in frame[LABEL].dropna().unique()), key=_sort_key)
    suite.append(expectation("expect_column_values_to_be_in_set", column=LABEL, value_set=classes))
    suite.append(expectation("expect_column_values_to_be_in_set", column=DOMAIN, value_set=domains))
    suite.append(expectation(DUPLICATES, column_list=list(features)))
    return suite


def _sort_key(value: Any) -> tuple:
    return (isinstance(value, str), value)


def suite_json(suite: list[dict]) -> str:
    """The suite as GX's JSON layout (name, expectations of type and kwargs), stable bytes."""
    return json.dumps({"name": SUITE_NAME, "expectations": suite}, indent=2) + "\n"


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
        suite.append({"type": item["type"], "kwargs": dict(item.get("kwargs") or {})})
    _to_gx(suite, where)  # fail now, naming the file, on an unknown type or bad kwargs
    return suite


def _to_gx(suite: list[dict], where: str = "suite") -> list:
    silence()
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    built = []
    for number, item in enumerate(suite, start=1):
        try:
            built.append(ExpectationConfiguration(**item).to_domain_obj())
        except Exception as exc:  # GX raises many types for unknown types and bad kwargs
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{where}: expectation {number} ({item['type']}): {message}") from None
    return built


def run_suite(frame: pd.DataFrame, suite: list[dict], name: str = SUITE_NAME):
    """Validate ``frame`` with GX on an ephemeral context; returns GX's validation result."""
    silence()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("pipeline")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all rows")
    )
    gx_suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=_to_gx(suite)))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(gx_suite, result_format=RESULT_FORMAT)


def _column(kwargs: dict) -> str:
    if "column" in kwargs:
        return str(kwargs["column"])
    return ", ".join(map(str, kwargs.get("column_list", [])))


def _table_failure(kind: str, kwargs: dict, result: dict) -> str:
    if kind == "expect_table_row_count_to_be_between":
        return f"{result.get('observed_value')} rows, expected at least {kwargs.get('min_value')}"
    if kind == "expect_column_values_to_be_in_type_list":
        return f"column '{kwargs['column']}' is not numeric"
    return f"{kind} failed on {_column(kwargs) or 'the table'}"


def _row_reasons(kind: str, kwargs: dict, frame: pd.DataFrame, rows: np.ndarray) -> list[str]:
    """The reason each of ``rows`` fails one expectation, naming the column and the value."""
    column = kwargs.get("column")
    if kind == "expect_column_values_to_not_be_null":
        return [f"{column} is missing"] * len(rows)
    if kind == "expect_column_values_to_be_between" and pd.api.types.is_numeric_dtype(
        frame[column]
    ):
        bounds = f"[{_bound(kwargs.get('min_value'), '-inf')}, "
        bounds += f"{_bound(kwargs.get('max_value'), 'inf')}]"
        values = frame[column].to_numpy(np.float64)[rows]
        return [
            f"{column} = {value:g} outside {bounds}"
            if np.isfinite(value)
            else f"{column} is {value}"
            for value in values
        ]
    if kind == "expect_column_values_to_be_in_set":
        values = frame[column].to_numpy()[rows]
        allowed = list(kwargs.get("value_set", []))
        return [f"{column} {plain(value)!r} not in {allowed}" for value in values]
    return [f"{_column(kwargs)} fails {kind}"] * len(rows)


def _bound(value: Any, unbounded: str) -> str:
    if value is None or abs(float(value)) >= sys.float_info.max:
        return unbounded
    return f"{float(value):g}"


def _duplicate_reasons(
    frame: pd.DataFrame, columns: list[str], rows: np.ndarray
) -> tuple[dict[int, str], int, int]:
    """Among rows whose features occur more than once (GX's compound-uniqueness result):
    identical features with conflicting labels quarantine every copy; otherwise exact copies
    of an earlier row go and the first stays. Returns (row -> reason, duplicates, conflicts).
    """
    if len(rows) == 0:
        return {}, 0, 0
    copies = frame.iloc[rows]
    groups = copies.groupby(columns, dropna=False, sort=False).ngroup().to_numpy()
    reasons: dict[int, str] = {}
    duplicates = conflicts = 0
    for group in np.unique(groups):
        members = rows[groups == group]
        labels = frame[LABEL].iloc[members]
        if labels.dropna().nunique() > 1:
            for row in members:
                others = [int(r) for r in members if r != row]
                reasons[int(row)] = f"features identical to row {_rows(others)} with another label"
            conflicts += len(members)
            continue
        whole = frame.iloc[members]
        first_of = whole.groupby(list(whole.columns), dropna=False, sort=False).ngroup()
        seen: dict[int, int] = {}
        for row, copy_group in zip(members, first_of.to_numpy(), strict=True):
            if copy_group in seen:
                reasons[int(row)] = f"duplicate of row {seen[copy_group]}"
                duplicates += 1
            else:
                seen[copy_group] = int(row)
    return reasons, duplicates, conflicts


def _rows(rows: list[int], limit: int = 3) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


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
) -> GateResult:
    """Validate the raw table with ``suite`` (default: built from params); quarantine failing
    rows, then check the quarantined share and the clean rows per class and domain.

    A table-level failure raises DataError. The dataset-level gates are listed in
    ``report["failures"]``, so that the caller can write every output before it stops.
    """
    frame = frame.reset_index(drop=True)
    suite = suite if suite is not None else params_suite(features, params, domains)
    result = run_suite(frame, suite)
    table_failures, missing_columns, summaries = [], [], []
    reasons: dict[int, list[str]] = defaultdict(list)
    checks: dict[str, int] = {"missing_columns": 0}
    failing_rows: dict[str, set[int]] = defaultdict(set)
    for item in result.results:
        config = item.expectation_config
        kind, kwargs = config.type, dict(config.kwargs)
        info = item.exception_info or {}
        if info.get("raised_exception"):
            message = str(info.get("exception_message", "")).strip().splitlines()
            table_failures.append(
                (
                    len(TABLE_ORDER) + 1,
                    f"the suite's {kind} on '{_column(kwargs)}' could not run "
                    f"({message[0] if message else 'error'}); fix the suite or the data",
                )
            )
            continue
        outcome = item.result or {}
        rows = np.asarray(outcome.get("unexpected_index_list") or [], dtype=np.int64)
        summary = {
            "type": kind,
            "column": _column(kwargs),
            "level": "table" if kind in TABLE_LEVEL else "row",
            "success": bool(item.success),
            "failing_rows": len(rows),
        }
        summaries.append(summary)
        if kind in TABLE_LEVEL or "unexpected_index_list" not in outcome:
            summary["level"] = "table"
            if not item.success and kind == "expect_column_to_exist":
                missing_columns.append(kwargs["column"])
            elif not item.success:
                rank = TABLE_ORDER.get(kind, len(TABLE_ORDER))
                table_failures.append((rank, _table_failure(kind, kwargs, outcome)))
            continue
        if kind == DUPLICATES:
            found, duplicates, conflicts = _duplicate_reasons(frame, kwargs["column_list"], rows)
            for row, reason in found.items():
                reasons[row].append(reason)
            checks["duplicate"] = checks.get("duplicate", 0) + duplicates
            checks["conflicting_label"] = checks.get("conflicting_label", 0) + conflicts
            summary["failing_rows"] = len(found)
            continue
        name = CHECK_NAMES.get(kind, kind.removeprefix("expect_"))
        if kind == "expect_column_values_to_be_in_set" and kwargs.get("column") in (
            DOMAIN,
            LABEL,
        ):
            name = "known_domain" if kwargs["column"] == DOMAIN else "known_label"
        failing_rows[name].update(rows.tolist())
        for row, reason in zip(rows.tolist(), _row_reasons(kind, kwargs, frame, rows), strict=True):
            reasons[row].append(reason)
    if missing_columns:
        raise DataError(f"{RAW}: missing columns {missing_columns} (data.features, label, domain)")
    if table_failures:
        # The root cause first: no rows, then a non-numeric column, then what follows from it.
        first = min(table_failures)[1]
        more = len(table_failures) - 1
        raise DataError(f"{RAW}: {first}" + (f" (and {more} more table checks)" if more else ""))
    for name in ("not_null", "in_range", "known_domain", "duplicate", "conflicting_label"):
        checks.setdefault(name, 0)
    checks |= {name: len(rows) for name, rows in failing_rows.items()}

    bad = np.array(sorted(reasons), dtype=np.int64)
    keep = np.ones(len(frame), dtype=bool)
    keep[bad] = False
    rejected = frame.iloc[bad].copy()
    rejected[REASON] = ["; ".join(reasons[row]) for row in bad.tolist()]
    rejected[RAW_ROW] = bad
    clean = restore_integer_labels(frame[keep].reset_index(drop=True))

    rows_in = len(frame)
    fraction = len(rejected) / rows_in if rows_in else 1.0
    failures = []
    if fraction > params.max_quarantine_fraction:
        failures.append(
            f"validate.max_quarantine_fraction: {len(rejected)} of {rows_in} rows "
            f"({fraction:.1%}) quarantined, more than {params.max_quarantine_fraction:.1%}; "
            f"see {REJECTED}"
        )
    classes = sorted((plain(v) for v in frame[LABEL].dropna().unique()), key=_sort_key)
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
    return GateResult(
        clean=clean,
        rejected=rejected.reset_index(drop=True),
        report=report,
        expectations=summaries,
    )
