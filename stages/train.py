"""Stage train: the base model on the base domain -> models/base/, metrics/train.json,
plots/train.csv, reports/samples.md (a causal LM's sample continuations; otherwise a line
saying there are none). With arch hf and train.objective mlm or clm it pretrains a language
model on the train splits' texts instead (stages.core.modeling.pretraining). Runs on CUDA
(bf16) when present, else on the CPU; with ``train.nproc`` > 1 it relaunches itself through
torchrun and trains with DDP. A killed run resumes from its last checkpoint
(``.checkpoints/train/``) and continues the same MLflow run."""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# (and what logging the model needs) on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker("stages.core.tracking.serving:prepare")

import time
from contextlib import nullcontext

import pandas as pd
import torch

from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.io import write_csv, write_json, write_text
from stages.core.common.params import Params, load_params
from stages.core.engine.checkpoints import Checkpoints, fingerprint
from stages.core.engine.distributed import (
    World,
    check_devices,
    needs_launch,
    process_group,
    relaunch,
)
from stages.core.engine.training import fit, fit_options, fit_summary, history_rows
from stages.core.modeling.architectures import count_parameters
from stages.core.modeling.model import Classifier, base_config, encode, save_model
from stages.core.modeling.pretraining import (
    PRETRAINING,
    epoch_metrics,
    perplexity_rows,
    pretrain,
    pretraining_inputs,
    pretraining_splits,
    pretraining_summary,
    samples_report,
)
from stages.core.modeling.text import save_text_model
from stages.core.modeling.text_training import train_text
from stages.core.tracking.registry import log_model
from stages.core.tracking.runs import stage_run


def main() -> None:
    params = load_params()
    check_devices(params.train)
    if needs_launch(params.train):
        relaunch("stages.train", params.train, "train")
        return
    with process_group(params.train.device) as world:
        train(params, world)


def train(params: Params, world: World) -> None:
    sections = {key: params.section(key) for key in ("model", "train")}
    sections["data"] = {"image_shape": params.data.image_shape}
    if params.model.arch == "hf":
        sections["data"]["text_column"] = params.data.text_column
    inputs = [layout.split_path("base", "train"), layout.split_path("base", "val")]
    pretraining = params.train.objective in PRETRAINING
    if pretraining:
        inputs = pretraining_inputs(params)
    checkpoints = Checkpoints(
        layout.checkpoint_dir("train"),
        fingerprint(sections, inputs),
        params.train.checkpoint_every,
        "train",
        main=world.is_main,
    )
    resumed = checkpoints.latest() is not None
    # Only rank 0 logs: the other workers train their shard and write nothing.
    key = checkpoints.fingerprint
    tracking = (
        stage_run(
            "train", params.tracking.experiment, sections, key, resumed, pipeline_params=params
        )
        if world.is_main
        else nullcontext()
    )
    with tracking as run:
        started = time.perf_counter()
        if run is not None:
            run.log_dataset(inputs[0], "training")
            run.log_dataset(inputs[1], "validation")
        if pretraining:
            return pretrain_language_model(params, run, checkpoints, started)
        if run is not None:  # a static DVC output: says there are no samples
            write_text(layout.SAMPLES_REPORT, samples_report([], params.train.objective))
        base_train, val = (pd.read_parquet(path) for path in inputs)
        if params.model.arch == "hf":
            return train_text_model(params, base_train, val, run, checkpoints, started)
        config = base_config(base_train, params.model, params.data)
        torch.manual_seed(params.train.seed)
        model = Classifier(config)
        n_parameters = count_parameters(model)
        result = fit(
            model,
            encode(base_train, config),
            encode(val, config),
            fit_options(params.section("train")),
            run.epoch_logger(checkpoints) if run is not None else None,
            checkpoints=checkpoints,
            progress="train",
        )
        if run is None:
            return
        save_model(layout.BASE_MODEL, model, config)
        summary = fit_summary(result)
        write_json(layout.TRAIN_METRICS, summary | {"parameters": n_parameters})
        write_csv(layout.TRAIN_PLOT, pd.DataFrame(history_rows(result)))
        run.log_metrics(
            {f"best_{k}": v for k, v in summary.items()}
            | {"parameters": n_parameters, "trainable_parameters": result.trainable_parameters}
            | {"wall_time_s": time.perf_counter() - started}
        )
        run.log_artifacts(layout.TRAIN_PLOT)
        run.send(log_model, layout.BASE_MODEL, layout.split_path("base", "val"))
        checkpoints.clear()
    print(
        f"train: {config.arch} of {n_parameters:,} parameters on {world.size} process(es), "
        f"val accuracy {summary['val_accuracy']:.3f} at epoch {summary['best_epoch']}"
    )


def train_text_model(params: Params, base_train, val, run, checkpoints, started: float) -> None:
    """model.arch hf: the checkpoint fine-tuned on the base domain (train.objective classify)
    or taken as it is (none) -> models/base/ with its tokenizer and provenance."""
    on_epoch = run.epoch_logger(checkpoints) if run is not None else None
    trained = train_text(
        params, base_train, val, on_epoch, checkpoints=checkpoints, progress="train"
    )
    if run is None:
        return
    n_parameters = count_parameters(trained.model)
    save_text_model(layout.BASE_MODEL, trained.model, trained.tokenizer, trained.config)
    if trained.result is None:  # objective none: nothing trained, no epochs to plot
        summary = {"objective": "none", "epochs_run": 0}
        history = pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "val_accuracy"])
    else:
        summary = fit_summary(trained.result)
        history = pd.DataFrame(history_rows(trained.result))
    counts = {"parameters": n_parameters, "truncated_rows": trained.truncated}
    write_json(layout.TRAIN_METRICS, summary | counts)
    write_csv(layout.TRAIN_PLOT, history)
    run.log_metrics(
        {f"best_{k}": v for k, v in summary.items() if not isinstance(v, str)}
        | counts
        | {"trainable_parameters": trained.trainable_parameters}
        | {"wall_time_s": time.perf_counter() - started}
    )
    run.log_artifacts(layout.TRAIN_PLOT)
    run.send(log_model, layout.BASE_MODEL, layout.split_path("base", "val"))
    checkpoints.clear()
    provenance = trained.config.provenance
    print(
        f"train: {params.model.pretrained} ({trained.config.model_type}, {n_parameters:,} "
        f"parameters, sha256 {provenance['sha256'][:12]}), objective {params.train.objective}"
        + (f", val accuracy {summary['val_accuracy']:.3f}" if trained.result else "")
        + f", {trained.truncated} row(s) truncated to {trained.config.max_length} tokens"
    )


def pretrain_language_model(params: Params, run, checkpoints, started: float) -> None:
    """arch hf, objective mlm or clm: a language model pretrained on the corpus (data.corpus,
    validated by the tokenize stage, or the train splits' texts; val's texts judge it)
    -> models/base/ (an LM checkpoint the finetune stage loads as a classifier), perplexity
    in metrics/train.json and plots/train.csv, reports/samples.md."""
    corpus, val, held_out, source = pretraining_splits(params)

    # One MLflow call an epoch, perplexity included.
    on_epoch = run.epoch_logger(checkpoints, epoch_metrics) if run is not None else None
    trained = pretrain(
        params, corpus, val, held_out, on_epoch,
        checkpoints=checkpoints, progress="train", source=source,
    )  # fmt: skip
    if run is None:
        return
    n_parameters = count_parameters(trained.model)
    save_text_model(layout.BASE_MODEL, trained.model, trained.tokenizer, trained.config)
    summary = pretraining_summary(trained) | {"parameters": n_parameters}
    write_json(layout.TRAIN_METRICS, summary)
    write_csv(layout.TRAIN_PLOT, pd.DataFrame(perplexity_rows(trained.result)))
    write_text(layout.SAMPLES_REPORT, samples_report(trained.samples, params.train.objective))
    run.log_metrics(
        {f"best_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        | {"trainable_parameters": trained.result.trainable_parameters}
        | {"wall_time_s": time.perf_counter() - started}
    )
    run.log_artifacts(layout.TRAIN_PLOT, layout.SAMPLES_REPORT)
    checkpoints.clear()
    print(
        f"train: {params.train.objective} pretraining of {trained.config.model_type} "
        f"({n_parameters:,} parameters, {trained.config.provenance['pretrained']}) on "
        f"{summary['blocks']['train']} blocks of {summary['block_size']} tokens, val "
        f"perplexity {summary['val_perplexity']} at epoch {summary['best_epoch']}"
    )


if __name__ == "__main__":
    run_as_script("train", main)
