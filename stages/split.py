"""Stage split: stratified, seeded train/val/test inside each domain -> data/splits/."""

import sys

import pandas as pd

from stages.core import layout
from stages.core.cli import run_stage
from stages.core.io import write_parquet
from stages.core.params import load_params
from stages.core.splitting import split_domains
from stages.core.tracking import stage_run


def main() -> None:
    params = load_params()
    sections = {"data": params.section("data"), "split": params.section("split")}
    with stage_run("split", params.tracking.experiment, sections) as run:
        clean = pd.read_parquet(layout.CLEAN)
        domains = {"base": params.data.base_domain, "target": params.data.target_domain}
        splits = split_domains(clean, params.split, domains)
        for name, frame in splits.items():
            write_parquet(layout.SPLITS / f"{name}.parquet", frame)
        run.log_metrics({f"rows_{name}": len(frame) for name, frame in splits.items()})
    sizes = ", ".join(f"{name} {len(frame)}" for name, frame in splits.items())
    print(f"split: {sizes}")


if __name__ == "__main__":
    run_stage("split", main, sys.argv[1:])
