"""The data gate: a Great Expectations suite built from params, and row quarantine."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pandas as pd

from stages.core.data import DOMAIN, LABEL, plain
from stages.core.errors import DataError
from stages.core.layout import RAW, REJECTED
from stages.core.params import ValidateParams
from stages.core.telemetry import silence

REASON = "reason"
# Row-level checks, grouped for the report: GX expectation type -> check name.
ROW_CHECKS = {
    "expect_column_values_to_not_be_null": "not_null",
    "expect_column_values_to_be_between": "in_range",
    "expect_column_values_to_be_in_set": "known_domain",
}


@dataclass(frozen=True)
class GateResult:
    clean: pd.DataFrame
    rejected: pd.DataFrame
    report: dict


def build_expectations(features: list[str], params: ValidateParams, domains: list[str]) -> list:
    """The suite's expectations: columns present, label and features not null, features finite
    and inside ``feature_range``, domain one of ``domains``."""
    silence()
    import great_expectations as gx

    low, high = params.feature_range or (-sys.float_info.max, sys.float_info.max)
    columns = [*features, LABEL, DOMAIN]
    suite = [gx.expectations.ExpectColumnToExist(column=c) for c in columns]
    suite += [gx.expectations.ExpectColumnValuesToNotBeNull(column=c) for c in columns]
    # Between finite bounds also rejects +/-inf.
    suite += [
        gx.expectations.ExpectColumnValuesToBeBetween(column=c, min_value=low, max_value=high)
        for c in features
    ]
    suite.append(gx.expectations.ExpectColumnValuesToBeInSet(column=DOMAIN, value_set=domains))
    return suite


def run_suite(frame: pd.DataFrame, expectations: list, name: str = "raw"):
    """Validate ``frame`` with GX on an ephemeral context; returns the validation result."""
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
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite, result_format={"result_format": "COMPLETE"})


def _describe(config) -> str:
    kwargs = config.kwargs
    if config.type == "expect_column_values_to_be_between":
        return f"{kwargs['column']} outside [{kwargs['min_value']:g}, {kwargs['max_value']:g}]"
    if config.type == "expect_column_values_to_be_in_set":
        return f"{kwargs['column']} not in {list(kwargs['value_set'])}"
    return f"{kwargs['column']} is null"


def quarantine_rows(frame: pd.DataFrame, result) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Split rows by the row-level failures in a GX result.

    Returns (clean rows, rejected rows with a ``reason`` column, per-check results).
    """
    missing = [
        item.expectation_config.kwargs["column"]
        for item in result.results
        if item.expectation_config.type == "expect_column_to_exist" and not item.success
    ]
    if missing:
        raise DataError(f"{RAW}: missing columns {missing} (data.features, label, domain)")
    reasons: dict[int, list[str]] = {}
    failed_rows: dict[str, set[int]] = {name: set() for name in ROW_CHECKS.values()}
    for item in result.results:
        config = item.expectation_config
        if config.type not in ROW_CHECKS:
            continue
        rows = item.result.get("unexpected_index_list") or []
        failed_rows[ROW_CHECKS[config.type]].update(rows)
        for row in rows:
            reasons.setdefault(row, []).append(_describe(config))
    # Rows failing each check (a row can fail several); missing columns stop the stage above.
    checks = {"missing_columns": 0} | {name: len(rows) for name, rows in failed_rows.items()}
    bad = sorted(reasons)
    rejected = frame.loc[bad].copy()
    rejected[REASON] = ["; ".join(reasons[row]) for row in bad]
    clean = frame.drop(index=bad).reset_index(drop=True)
    return restore_integer_labels(clean), rejected.reset_index(drop=True), checks


def restore_integer_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer labels that a missing value turned into floats become integers again."""
    labels = frame[LABEL]
    if pd.api.types.is_float_dtype(labels) and labels.notna().all() and (labels % 1 == 0).all():
        frame = frame.assign(**{LABEL: labels.astype("int64")})
    return frame


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


def gate(
    frame: pd.DataFrame, features: list[str], params: ValidateParams, domains: list[str]
) -> GateResult:
    """Validate the raw table: quarantine bad rows, then check the share and class counts.

    Failures of the dataset-level gates are listed in ``report["failures"]`` so that the
    caller can write every output before it stops.
    """
    result = run_suite(frame, build_expectations(features, params, domains))
    clean, rejected, checks = quarantine_rows(frame, result)
    rows_in = len(frame)
    fraction = len(rejected) / rows_in if rows_in else 1.0
    failures = []
    if fraction > params.max_quarantine_fraction:
        failures.append(
            f"validate.max_quarantine_fraction: {len(rejected)} of {rows_in} rows "
            f"({fraction:.1%}) quarantined, more than {params.max_quarantine_fraction:.1%}; "
            f"see {REJECTED}"
        )
    classes = sorted(frame[LABEL].dropna().unique())
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
    return GateResult(clean=clean, rejected=rejected, report=report)
