"""Stage validate: the Great Expectations gate. Clean rows go on; bad rows are quarantined
with their reasons; the stage fails when too many rows are bad or a class is too small.
-> data/clean/, data/quarantine/, reports/validation.json, reports/validation.html.

``python -m stages.validate --infer-suite data/suites/raw.json`` instead writes a suite
inferred from the current raw table, to review, commit and name in ``validate.suite``.
"""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker()

import argparse
import sys

import pandas as pd

from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.errors import DataError, GateError
from stages.core.common.io import write_json, write_parquet, write_text
from stages.core.common.params import load_params
from stages.core.common.schema import RESERVED
from stages.core.data.expectations import gate
from stages.core.data.suites import infer_suite, infer_text_suite, load_suite, suite_json
from stages.core.data.validation_report import render_validation_html
from stages.core.tracking.runs import stage_run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__)
    parser.add_argument(
        "--infer-suite",
        metavar="PATH",
        help="write a suite inferred from data/raw/ to PATH (e.g. data/suites/raw.json) and stop",
    )
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def read_raw() -> pd.DataFrame:
    if not layout.RAW.is_file():
        raise DataError(f"{layout.RAW}: not found; run `dvc repro ingest` first")
    return pd.read_parquet(layout.RAW)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv or [])
    params = load_params()
    domains = params.data.domains()
    text = params.data.text_column is not None
    if args.infer_suite:
        raw = read_raw()
        features = params.data.features or [c for c in raw.columns if c not in RESERVED]
        suite = infer_text_suite(raw, domains) if text else infer_suite(raw, features, domains)
        write_text(args.infer_suite, suite_json(suite))
        print(
            f"validate: wrote {len(suite)} expectations inferred from {layout.RAW} "
            f"({len(raw)} rows) to {args.infer_suite}; review it, commit it and set "
            f"validate.suite: {args.infer_suite}"
        )
        return
    suite = load_suite(params.validate_.suite) if params.validate_.suite else None
    sections = {"data": params.section("data"), "validate": params.section("validate")}
    with stage_run("validate", params.tracking.experiment, sections, pipeline_params=params) as run:
        raw = read_raw()
        features = (
            [] if text else params.data.features or [c for c in raw.columns if c not in RESERVED]
        )
        result = gate(raw, features, params.validate_, domains, suite, text=text)
        write_parquet(layout.CLEAN, result.clean)
        write_parquet(layout.REJECTED, result.rejected)
        write_json(layout.VALIDATION_REPORT, result.report)
        built = "validate.text_length" if text else "validate.feature_range"
        source = params.validate_.suite or f"built from params ({built}, domains)"
        page = render_validation_html(result.report, result.expectations, result.rejected, source)
        write_text(layout.VALIDATION_HTML, page)
        run.log_metrics(result.report)
        run.log_artifacts(layout.VALIDATION_REPORT, layout.VALIDATION_HTML, parent=True)
        report = result.report
        print(
            f"validate: {report['rows_clean']} clean, {report['rows_quarantined']} quarantined "
            f"of {report['rows_in']} rows -> {layout.CLEAN}, {layout.VALIDATION_HTML}"
        )
        if report["failures"]:
            raise GateError(report["failures"][0])


if __name__ == "__main__":
    run_as_script("validate", lambda: main(sys.argv[1:]))
