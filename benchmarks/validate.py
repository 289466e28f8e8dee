"""The validate gate (stages.core.data.expectations.gate, Great Expectations doing the checks) vs a
plain pandas/numpy implementation of the same checks, on 1,000,000 rows x 64 features.

Each side runs in its own process, on the same seeded frame with about 1% damaged rows
(missing, infinite and out-of-range values, unknown domains, missing labels), exact duplicates
and conflicting labels. Both must quarantine exactly the same rows. Prints the time ratio
(target <= 3x) and each side's peak memory (peak RSS of the process) against the frame's size
(target <= 4x). ``--per-column`` also times GX's stock suite, one expectation per column.
Run from the repo root:

    .venv/bin/python -m benchmarks.validate [--rows 1000000] [--per-column]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

FEATURES = [f"pixel_{i // 8}_{i % 8}" for i in range(64)]
DOMAINS = ["base", "target"]
LOW, HIGH = 0.0, 16.0
MAX_QUARANTINE, MIN_ROWS = 0.05, 5


def make_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """The raw table, damaged; built in place so that building it costs no more than it holds."""
    rng = np.random.default_rng(seed)
    values = np.empty((rows, len(FEATURES)), dtype=np.float64)
    for start in range(0, rows, 65536):  # in blocks: no full-size temporaries
        block = values[start : start + 65536]
        block[:] = rng.integers(0, 17, size=block.shape)
    frame = pd.DataFrame(values, columns=FEATURES, copy=False)
    frame["label"] = rng.integers(0, 10, rows).astype(np.float64)
    frame["domain"] = np.where(rng.random(rows) < 0.5, "base", "target").astype(object)
    picks = rng.choice(rows, size=rows // 100, replace=False)
    kinds = np.array_split(picks, 7)
    columns = rng.integers(0, len(FEATURES), size=len(picks))
    for i, row in enumerate(kinds[0]):
        frame.iat[row, columns[i]] = np.nan
    for i, row in enumerate(kinds[1]):
        frame.iat[row, columns[i]] = np.inf
    for i, row in enumerate(kinds[2]):
        frame.iat[row, columns[i]] = 17.0 + i % 5
    frame.loc[kinds[3], "domain"] = "scanner-3"
    frame.loc[kinds[4], "label"] = np.nan
    copies = kinds[5]  # exact copies of the row before each
    frame.iloc[copies] = frame.iloc[copies - 1].to_numpy()
    conflicts = kinds[6]  # same pixels as the row before, another label
    frame.iloc[conflicts, : len(FEATURES)] = frame.iloc[conflicts - 1, : len(FEATURES)].to_numpy()
    frame.loc[conflicts, "label"] = (frame.loc[conflicts - 1, "label"].to_numpy() + 1) % 10
    return frame


def plain_gate(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The same checks and decisions in pandas/numpy: table checks, then row reasons,
    duplicates (keep the first), conflicting labels (drop every copy), share and class counts."""
    missing = [c for c in [*FEATURES, "label", "domain"] if c not in frame.columns]
    if missing or len(frame) == 0:
        raise ValueError(f"missing columns {missing} or no rows")
    if not all(pd.api.types.is_numeric_dtype(frame[c]) for c in FEATURES):
        raise ValueError("non-numeric feature")
    x = frame[FEATURES].to_numpy()
    null = np.isnan(x)
    outside = ~null & ((x < LOW) | (x > HIGH))
    label_null = frame["label"].isna().to_numpy()
    domain_null = frame["domain"].isna().to_numpy()
    unknown = ~domain_null & ~frame["domain"].isin(DOMAINS).to_numpy()
    hashes = pd.util.hash_pandas_object(frame[FEATURES], index=False)
    flagged = np.flatnonzero(hashes.duplicated(keep=False).to_numpy())
    copies = frame.iloc[flagged]
    same = copies.groupby(FEATURES, dropna=False, sort=False).ngroup().to_numpy()
    labels = copies["label"].groupby(same).nunique()
    conflict = np.isin(same, labels.index[labels.to_numpy() > 1])
    exact = copies.groupby(list(copies.columns), dropna=False, sort=False).ngroup().to_numpy()
    first = pd.Series(flagged).groupby(exact).transform("min").to_numpy()
    duplicate = ~conflict & (flagged != first)

    reasons: dict[int, list[str]] = {}
    for row in np.flatnonzero(label_null):
        reasons.setdefault(int(row), []).append("label is missing")
    for row in np.flatnonzero(domain_null):
        reasons.setdefault(int(row), []).append("domain is missing")
    for row, col in zip(*np.nonzero(null), strict=True):
        reasons.setdefault(int(row), []).append(f"{FEATURES[col]} is missing")
    for row, col in zip(*np.nonzero(outside), strict=True):
        value = x[row, col]
        text = f"= {value:g} outside [0, 16]" if np.isfinite(value) else f"is {value}"
        reasons.setdefault(int(row), []).append(f"{FEATURES[col]} {text}")
    for row in flagged[conflict]:
        reasons.setdefault(int(row), []).append("features identical to another row's")
    for row, original in zip(flagged[duplicate], first[duplicate], strict=True):
        reasons.setdefault(int(row), []).append(f"duplicate of row {original}")
    for row in np.flatnonzero(unknown):
        reasons.setdefault(int(row), []).append("domain not in the set")
    bad = np.array(sorted(reasons), dtype=np.int64)
    keep = np.ones(len(frame), dtype=bool)
    keep[bad] = False
    rejected = frame.iloc[bad].reset_index(drop=True)
    rejected["reason"] = ["; ".join(reasons[r]) for r in bad.tolist()]
    rejected["raw_row"] = bad
    clean = frame[keep].reset_index(drop=True)
    counts = clean.groupby(["domain", "label"]).size()
    report = {
        "rows_in": len(frame),
        "rows_clean": len(clean),
        "rows_quarantined": len(rejected),
        "passed": len(rejected) / len(frame) <= MAX_QUARANTINE and counts.min() >= MIN_ROWS,
    }
    return clean, rejected, report


def per_column_suite() -> list[dict]:
    """The same checks as GX's stock expectations, one per column (what the gate avoids)."""
    from stages.core.data.suites import NUMERIC_TYPES, expectation

    suite = [
        expectation("expect_column_to_exist", column=c) for c in [*FEATURES, "label", "domain"]
    ]
    suite.append(expectation("expect_table_row_count_to_be_between", min_value=1))
    for column in FEATURES:
        suite += [
            expectation(
                "expect_column_values_to_be_in_type_list", column=column, type_list=NUMERIC_TYPES
            ),
            expectation("expect_column_values_to_not_be_null", column=column),
            expectation(
                "expect_column_values_to_be_between", column=column, min_value=LOW, max_value=HIGH
            ),
        ]
    suite += [
        expectation("expect_column_values_to_not_be_null", column="label"),
        expectation("expect_column_values_to_not_be_null", column="domain"),
        expectation("expect_column_values_to_be_in_set", column="domain", value_set=DOMAINS),
        expectation("expect_compound_columns_to_be_unique", column_list=FEATURES),
    ]
    return suite


def our_gate(
    frame: pd.DataFrame, suite: list[dict] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    from stages.core.common.data_params import ValidateParams
    from stages.core.data.expectations import gate

    params = ValidateParams(
        feature_range=(LOW, HIGH),
        max_quarantine_fraction=MAX_QUARANTINE,
        min_rows_per_class=MIN_ROWS,
    )
    result = gate(frame, FEATURES, params, DOMAINS, suite)
    return result.clean, result.rejected, result.report


def per_column(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return our_gate(frame, per_column_suite())


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(side: str, rows: int) -> dict:
    """One side in this process: build the frame, import, validate; times and peak RSS."""
    start = time.perf_counter()
    if side != "plain":
        from stages.core.common.telemetry import silence

        silence()
        import great_expectations  # noqa: F401

        import stages.core.data.expectations  # noqa: F401
        import stages.core.data.gx_multicolumn  # noqa: F401
    imports = time.perf_counter() - start
    frame = make_frame(rows)
    frame_mib = frame.memory_usage(deep=True).sum() / 2**20
    before = _rss_mib()
    runs = {"plain": plain_gate, "gx": our_gate, "gx-per-column": per_column}
    run = runs[side]
    start = time.perf_counter()
    clean, rejected, report = run(frame)
    seconds = time.perf_counter() - start
    return {
        "side": side,
        "seconds": seconds,
        "import_seconds": imports,
        "frame_mib": frame_mib,
        "rss_before_mib": before,
        "peak_rss_mib": _rss_mib(),
        "rows_clean": len(clean),
        "rejected_rows": rejected["raw_row"].tolist(),
        "passed": bool(report["passed"]),
    }


def run_side(side: str, rows: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.validate", "--side", side, "--rows", str(rows)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--per-column",
        action="store_true",
        help="also time the gate with GX's stock one-expectation-per-column suite",
    )
    parser.add_argument("--side", choices=["gx", "plain", "gx-per-column"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.rows)))
        return
    plain, ours = run_side("plain", args.rows), run_side("gx", args.rows)
    if ours["rejected_rows"] != plain["rejected_rows"] or ours["rows_clean"] != plain["rows_clean"]:
        raise SystemExit("the two implementations quarantined different rows")
    print(
        f"{args.rows:,} rows x {len(FEATURES)} features, frame {ours['frame_mib']:.0f} MiB; "
        f"{len(ours['rejected_rows']):,} rows quarantined by both"
    )
    for result in (plain, ours):
        name = "plain pandas/numpy" if result["side"] == "plain" else "gate (GX)"
        print(
            f"{name:>19}: {result['seconds']:.2f} s, peak RSS {result['peak_rss_mib']:.0f} MiB "
            f"= {result['peak_rss_mib'] / result['frame_mib']:.2f}x the frame "
            f"({(result['peak_rss_mib'] - result['rss_before_mib']) / result['frame_mib']:.2f}x "
            f"on top of it while validating)"
        )
    print(f"GX import (once per process, not in the times above): {ours['import_seconds']:.1f} s")
    ratio = ours["seconds"] / plain["seconds"]
    print(f"time ratio gate/plain: {ratio:.2f}x (target <= 3x)")
    print(
        f"peak memory of the gate: {ours['peak_rss_mib'] / ours['frame_mib']:.2f}x the frame "
        "(target <= 4x)"
    )
    if args.per_column:
        stock = run_side("gx-per-column", args.rows)
        same = stock["rejected_rows"] == plain["rejected_rows"]
        print(
            f"stock GX, one expectation per column: {stock['seconds']:.2f} s = "
            f"{stock['seconds'] / plain['seconds']:.2f}x plain, peak RSS "
            f"{stock['peak_rss_mib'] / stock['frame_mib']:.2f}x the frame "
            f"({'same' if same else 'DIFFERENT'} rows quarantined)"
        )


if __name__ == "__main__":
    main()
