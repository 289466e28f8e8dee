"""Stage validate: the Great Expectations gate. Clean rows go on; bad rows are quarantined
with their reasons; the stage fails when too many rows are bad or a class is too small."""

import pandas as pd

from stages.core import layout
from stages.core.cli import run_stage
from stages.core.data import RESERVED
from stages.core.errors import GateError
from stages.core.expectations import gate
from stages.core.io import write_json, write_parquet
from stages.core.params import load_params
from stages.core.tracking import stage_run


def main() -> None:
    params = load_params()
    sections = {"data": params.section("data"), "validate": params.section("validate")}
    with stage_run("validate", params.tracking.experiment, sections) as run:
        raw = pd.read_parquet(layout.RAW)
        features = params.data.features or [c for c in raw.columns if c not in RESERVED]
        domains = [params.data.base_domain, params.data.target_domain]
        result = gate(raw, features, params.validate_, domains)
        write_parquet(layout.CLEAN, result.clean)
        write_parquet(layout.REJECTED, result.rejected)
        write_json(layout.VALIDATION_REPORT, result.report)
        run.log_metrics(result.report)
        run.log_artifacts(layout.VALIDATION_REPORT, parent=True)
        report = result.report
        print(
            f"validate: {report['rows_clean']} clean, {report['rows_quarantined']} quarantined "
            f"of {report['rows_in']} rows -> {layout.CLEAN}"
        )
        if report["failures"]:
            raise GateError(report["failures"][0])


if __name__ == "__main__":
    run_stage("validate", main)
