"""Stage finetune: adapt the base model to the target domain from a few labelled examples
per class (finetune.strategy: head, full or lora) -> models/finetuned/, metrics/finetune.json,
plots/finetune.csv. A killed run resumes from its last checkpoint (``.checkpoints/finetune/``)
and continues the same MLflow run."""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# (and what logging the model needs) on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker("stages.core.tracking.serving:prepare")

import time

import pandas as pd

from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.io import write_csv, write_json
from stages.core.common.params import load_params
from stages.core.engine.checkpoints import Checkpoints, fingerprint
from stages.core.engine.devices import resolve_device
from stages.core.engine.training import fit_summary, history_rows
from stages.core.modeling.architectures import count_parameters
from stages.core.modeling.finetuning import fine_tune, finetune_text, sample_shots
from stages.core.modeling.model import load_model, save_model
from stages.core.modeling.text import is_text_model, load_text_model, save_text_model
from stages.core.tracking.registry import log_model
from stages.core.tracking.runs import stage_run

TRAIN_KEYS = ("device", "precision", "cpu_threads", "compile")


def main() -> None:
    params = load_params()
    resolve_device(params.train.device)
    sections = {"finetune": params.section("finetune")}
    sections["train"] = {k: getattr(params.train, k) for k in TRAIN_KEYS}
    inputs = [layout.BASE_MODEL, layout.split_path("target", "train")]
    inputs.append(layout.split_path("target", "val"))
    every = params.finetune.checkpoint_every
    checkpoints = Checkpoints(
        layout.checkpoint_dir("finetune"), fingerprint(sections, inputs), every, "finetune"
    )
    resumed = checkpoints.latest() is not None
    experiment = params.tracking.experiment
    key = checkpoints.fingerprint
    with stage_run("finetune", experiment, sections, key, resumed, pipeline_params=params) as run:
        started = time.perf_counter()
        text = is_text_model(layout.BASE_MODEL)
        base, base_config = (None, None) if text else load_model(layout.BASE_MODEL)
        run.log_dataset(layout.split_path("target", "train"), "training")
        run.log_dataset(layout.split_path("target", "val"), "validation")
        shots = sample_shots(
            pd.read_parquet(layout.split_path("target", "train")),
            params.finetune.shots_per_class,
            params.finetune.seed,
        )
        val = pd.read_parquet(layout.split_path("target", "val"))
        if text:
            return finetune_text_model(params, shots, val, run, checkpoints, started)
        model, config, result = fine_tune(
            base,
            base_config,
            shots,
            val,
            params,
            params.finetune.seed,
            run.epoch_logger(checkpoints),
            checkpoints=checkpoints,
            progress="finetune",
        )
        save_model(layout.FINETUNED_MODEL, model, config)
        summary = fit_summary(result) | {
            "shots": len(shots),
            "trainable_parameters": result.trainable_parameters,
        }
        write_json(layout.FINETUNE_METRICS, summary)
        write_csv(layout.FINETUNE_PLOT, pd.DataFrame(history_rows(result)))
        run.log_metrics(
            {f"final_{k}": v for k, v in summary.items()}
            | {"wall_time_s": time.perf_counter() - started}
        )
        run.log_artifacts(layout.FINETUNE_PLOT)
        run.send(log_model, layout.FINETUNED_MODEL, layout.split_path("target", "val"))
        checkpoints.clear()
    print(
        f"finetune: {params.finetune.strategy} trained {result.trainable_parameters:,} of "
        f"{count_parameters(model):,} parameters on {len(shots)} shots, "
        f"target val accuracy {summary['val_accuracy']:.3f}"
    )


def finetune_text_model(params, shots, val, run, checkpoints, started: float) -> None:
    """A text base model (model.arch hf) adapted to the target's rows -> models/finetuned/, a
    Hugging Face checkpoint (finetune.lora.save: merged weights, the adapter, or both)."""
    base, tokenizer, base_config = load_text_model(layout.BASE_MODEL)
    tuned = finetune_text(
        base, tokenizer, base_config, shots, val, params, params.finetune.seed,
        run.epoch_logger(checkpoints),
        checkpoints=checkpoints, progress="finetune",
    )  # fmt: skip
    n_parameters = count_parameters(tuned.model)
    form = params.finetune.lora.save if params.finetune.strategy == "lora" else "merged"
    save_text_model(
        layout.FINETUNED_MODEL, tuned.model, tokenizer, tuned.config, form, layout.BASE_MODEL
    )
    summary = fit_summary(tuned.result) | {
        "shots": len(shots),
        "trainable_parameters": tuned.trainable_parameters,
        "truncated_rows": tuned.truncated,
    }
    write_json(layout.FINETUNE_METRICS, summary)
    write_csv(layout.FINETUNE_PLOT, pd.DataFrame(history_rows(tuned.result)))
    run.log_metrics(
        {f"final_{k}": v for k, v in summary.items()}
        | {"parameters": n_parameters, "wall_time_s": time.perf_counter() - started}
    )
    run.log_artifacts(layout.FINETUNE_PLOT)
    run.send(log_model, layout.FINETUNED_MODEL, layout.split_path("target", "val"))
    checkpoints.clear()
    print(
        f"finetune: {params.finetune.strategy} trained {tuned.trainable_parameters:,} of "
        f"{n_parameters:,} parameters of {base_config.model_type} on {len(shots)} rows, "
        f"target val accuracy {summary['val_accuracy']:.3f}"
        + (f" (saved: {form})" if params.finetune.strategy == "lora" else "")
    )


if __name__ == "__main__":
    run_as_script("finetune", main)
