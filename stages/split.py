"""Stage split: stratified, seeded train/val/test inside each domain -> data/splits/; then
the leakage check (no feature row in two parts of a domain; for text, no normalized text in
two parts) and the drift report -> reports/drift.json, metrics/drift.json, plots/drift.csv.
A one-domain text dataset's splits are written under both roles (target_* = base_*)."""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker()


import pandas as pd

from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.io import write_csv, write_json, write_parquet
from stages.core.common.params import Params, load_params
from stages.core.common.schema import RESERVED
from stages.core.data.drift import drift_report, most_shifted, text_drift_report
from stages.core.data.splitting import (
    check_leakage,
    check_text_leakage,
    mirror_single_domain,
    split_domains,
)
from stages.core.tracking.runs import stage_run


def main() -> None:
    params = load_params()
    sections = {"data": params.section("data"), "split": params.section("split")}
    if params.data.text_column is not None:
        return split_texts(params, sections)
    with stage_run("split", params.tracking.experiment, sections, pipeline_params=params) as run:
        clean = pd.read_parquet(layout.CLEAN)
        features = [c for c in clean.columns if c not in RESERVED]
        domains = {"base": params.data.base_domain, "target": params.data.target_domain}
        splits = split_domains(clean, params.split, domains)
        check_leakage(splits, features, domains)
        for name, frame in splits.items():
            write_parquet(layout.SPLITS / f"{name}.parquet", frame)
        drift = drift_report(splits, features)
        write_json(layout.DRIFT_REPORT, drift)
        write_json(layout.DRIFT_METRICS, drift["summary"])
        write_csv(layout.DRIFT_PLOT, pd.DataFrame(most_shifted(drift)))
        run.log_metrics({f"rows_{name}": len(frame) for name, frame in splits.items()})
        run.log_metrics({"drift": drift["summary"]})
        run.log_artifacts(layout.DRIFT_REPORT, layout.DRIFT_PLOT)
    sizes = ", ".join(f"{name} {len(frame)}" for name, frame in splits.items())
    gap = drift["summary"]["domain_gap"]
    print(
        f"split: {sizes}; domain gap: PSI mean {gap['psi_mean']:.3f}, KS mean {gap['ks_mean']:.3f}"
    )


def split_texts(params: Params, sections: dict) -> None:
    """The split of a text dataset: its leakage check and text drift."""
    single = params.data.single_domain
    domains = {"base": params.data.base_domain}
    if not single:
        domains["target"] = params.data.target_domain
    with stage_run("split", params.tracking.experiment, sections, pipeline_params=params) as run:
        clean = pd.read_parquet(layout.CLEAN)
        splits = split_domains(clean, params.split, domains)
        check_text_leakage(splits, domains)
        drift = text_drift_report(splits, single_domain=single)
        if single:
            splits = mirror_single_domain(splits)
        for name, frame in splits.items():
            write_parquet(layout.SPLITS / f"{name}.parquet", frame)
        write_json(layout.DRIFT_REPORT, drift)
        write_json(layout.DRIFT_METRICS, drift["summary"])
        comparison = "base_train_vs_test" if single else "domain_gap"
        write_csv(layout.DRIFT_PLOT, pd.DataFrame(most_shifted(drift, comparison)))
        run.log_metrics({f"rows_{name}": len(frame) for name, frame in splits.items()})
        run.log_metrics({"drift": drift["summary"]})
        run.log_artifacts(layout.DRIFT_REPORT, layout.DRIFT_PLOT)
    sizes = ", ".join(f"{name} {len(frame)}" for name, frame in splits.items())
    shift = drift["summary"][comparison]
    print(
        f"split: {sizes}; {comparison.replace('_', ' ')}: length PSI {shift['length_psi']:.3f}, "
        f"unseen tokens {shift['unseen_token_share']:.1%}"
    )


if __name__ == "__main__":
    run_as_script("split", main)
