"""Stage train: the base model on the base domain -> models/base/, metrics/train.json,
plots/train.csv. Runs on CUDA (bf16) when present, else on the CPU."""

import sys
import time

import pandas as pd
import torch

from stages.core import layout
from stages.core.cli import run_stage
from stages.core.data import LABEL, RESERVED
from stages.core.io import write_csv, write_json
from stages.core.model import (
    Classifier,
    ModelConfig,
    encode,
    fit_scaling,
    save_model,
    trainable_parameters,
)
from stages.core.params import load_params
from stages.core.registry import log_model
from stages.core.tracking import stage_run
from stages.core.training import FitOptions, fit, fit_summary, history_rows


def main() -> None:
    params = load_params()
    sections = {key: params.section(key) for key in ("model", "train")}
    sections["data"] = {"image_shape": params.data.image_shape}
    with stage_run("train", params.tracking.experiment, sections) as run:
        started = time.perf_counter()
        train = pd.read_parquet(layout.split_path("base", "train"))
        val = pd.read_parquet(layout.split_path("base", "val"))
        run.log_dataset(layout.split_path("base", "train"), "training")
        run.log_dataset(layout.split_path("base", "val"), "validation")
        features = [c for c in train.columns if c not in RESERVED]
        mean, std = fit_scaling(train[features].to_numpy(), params.model.scaling)
        config = ModelConfig(
            arch=params.model.arch,
            n_features=len(features),
            hidden=list(params.model.hidden),
            dropout=params.model.dropout,
            classes=sorted(train[LABEL].unique().tolist()),
            feature_names=features,
            mean=mean,
            std=std,
            image_shape=params.data.image_shape,
            trained_on={"domain": params.data.base_domain, "rows": len(train)},
        )
        torch.manual_seed(params.train.seed)
        model = Classifier(config)
        options = FitOptions(**params.section("train"))
        result = fit(model, encode(train, config), encode(val, config), options, run.log_epoch)
        save_model(layout.BASE_MODEL, model, config)
        summary = fit_summary(result)
        write_json(layout.TRAIN_METRICS, summary)
        write_csv(layout.TRAIN_PLOT, pd.DataFrame(history_rows(result)))
        run.log_metrics(
            {f"best_{k}": v for k, v in summary.items()}
            | {"trainable_parameters": trainable_parameters(model)}
            | {"wall_time_s": time.perf_counter() - started}
        )
        run.log_artifacts(layout.TRAIN_PLOT)
        run.send(log_model, layout.BASE_MODEL, layout.split_path("base", "val"))
    print(f"train: val accuracy {summary['val_accuracy']:.3f} at epoch {summary['best_epoch']}")


if __name__ == "__main__":
    run_stage("train", main, sys.argv[1:])
