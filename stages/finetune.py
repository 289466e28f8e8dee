"""Stage finetune: adapt the base model to the target domain from a few labelled examples
per class -> models/finetuned/, metrics/finetune.json, plots/finetune.csv."""

import pandas as pd

from stages.core import layout
from stages.core.architectures import count_parameters
from stages.core.cli import run_stage
from stages.core.finetuning import fine_tune, sample_shots
from stages.core.io import write_csv, write_json
from stages.core.model import load_model, save_model
from stages.core.params import load_params
from stages.core.tracking import stage_run
from stages.core.training import fit_summary, history_rows


def main() -> None:
    params = load_params()
    sections = {"finetune": params.section("finetune")}
    sections["train"] = {
        k: getattr(params.train, k) for k in ("device", "precision", "cpu_threads")
    }
    with stage_run("finetune", params.tracking.experiment, sections) as run:
        base, base_config = load_model(layout.BASE_MODEL)
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
            "trainable_parameters": result.trainable_parameters,
        }
        write_json(layout.FINETUNE_METRICS, summary)
        write_csv(layout.FINETUNE_PLOT, pd.DataFrame(history_rows(result)))
        run.log_metrics({f"final_{k}": v for k, v in summary.items()})
        run.log_artifacts(layout.FINETUNED_MODEL, layout.FINETUNE_PLOT)
    print(
        f"finetune: {params.finetune.strategy} trained {result.trainable_parameters:,} of "
        f"{count_parameters(model):,} parameters on {len(shots)} shots, "
        f"target val accuracy {summary['val_accuracy']:.3f}"
    )


if __name__ == "__main__":
    run_stage("finetune", main)
