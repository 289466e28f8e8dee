"""Stage finetune: adapt the base model to the target domain from a few labelled examples
per class -> models/finetuned/, metrics/finetune.json, plots/finetune.csv."""

import sys
import time

import pandas as pd

from stages.core import layout
from stages.core.cli import run_stage
from stages.core.finetuning import fine_tune, sample_shots
from stages.core.io import write_csv, write_json
from stages.core.model import load_model, save_model, trainable_parameters
from stages.core.params import load_params
from stages.core.registry import log_model
from stages.core.tracking import stage_run
from stages.core.training import fit_summary, history_rows


def main() -> None:
    params = load_params()
    sections = {"finetune": params.section("finetune")}
    sections["train"] = {
        k: getattr(params.train, k) for k in ("device", "precision", "cpu_threads")
    }
    with stage_run("finetune", params.tracking.experiment, sections) as run:
        started = time.perf_counter()
        base, base_config = load_model(layout.BASE_MODEL)
        run.log_dataset(layout.split_path("target", "train"), "training")
        run.log_dataset(layout.split_path("target", "val"), "validation")
        shots = sample_shots(
            pd.read_parquet(layout.split_path("target", "train")),
            params.finetune.shots_per_class,
            params.finetune.seed,
        )
        val = pd.read_parquet(layout.split_path("target", "val"))
        model, config, result = fine_tune(
            base, base_config, shots, val, params, params.finetune.seed, run.log_epoch
        )
        save_model(layout.FINETUNED_MODEL, model, config)
        summary = fit_summary(result) | {
            "shots": len(shots),
            "trainable_parameters": trainable_parameters(model),
        }
        write_json(layout.FINETUNE_METRICS, summary)
        write_csv(layout.FINETUNE_PLOT, pd.DataFrame(history_rows(result)))
        run.log_metrics(
            {f"final_{k}": v for k, v in summary.items()}
            | {"wall_time_s": time.perf_counter() - started}
        )
        run.log_artifacts(layout.FINETUNE_PLOT)
        run.send(log_model, layout.FINETUNED_MODEL, layout.split_path("target", "val"))
    print(f"finetune: {len(shots)} shots, target val accuracy {summary['val_accuracy']:.3f}")


if __name__ == "__main__":
    run_stage("finetune", main, sys.argv[1:])
