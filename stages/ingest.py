"""Stage ingest: the source in params -> data/raw/dataset.parquet (features, label, domain; for
a text dataset text, label, domain)."""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker()


from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.io import write_parquet
from stages.core.common.params import load_params
from stages.core.common.schema import DOMAIN, LABEL
from stages.core.data.ingest import build_raw_dataset, skipped_columns
from stages.core.data.sources import load_source
from stages.core.tracking.runs import stage_run


def main() -> None:
    params = load_params()
    sections = {
        "data": params.section("data"),
        "validate": {"feature_range": params.section("validate")["feature_range"]},
    }
    with stage_run("ingest", params.tracking.experiment, sections, pipeline_params=params) as run:
        source = load_source(params.data)
        raw = build_raw_dataset(source, params.data, params.validate_.feature_range)
        skipped = skipped_columns(source, params.data)
        write_parquet(layout.RAW, raw)
        domains = raw[DOMAIN].value_counts()
        text = params.data.text_column is not None
        run.log_metrics(
            {
                "rows": len(raw),
                **({} if text else {"features": raw.shape[1] - 2}),
                "classes": raw[LABEL].nunique(),
                "rows_base": int(domains.get(params.data.base_domain, 0)),
                "rows_target": int(domains.get(params.data.target_domain, 0)),
            }
        )
    if skipped:
        print(f"ingest: not used: columns {skipped} (list them in data.features to use them)")
    if text:
        print(f"ingest: {len(raw)} texts from column {params.data.text_column!r} -> {layout.RAW}")
    else:
        print(f"ingest: {len(raw)} rows, {raw.shape[1] - 2} features -> {layout.RAW}")


if __name__ == "__main__":
    run_as_script("ingest", main)
