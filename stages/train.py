"""Stage train: the base model on the base domain -> models/base/, metrics/train.json,
plots/train.csv. Runs on CUDA (bf16) when present, else on the CPU."""

import pandas as pd
import torch

from stages.core import layout
from stages.core.architectures import count_parameters
from stages.core.cli import run_stage
from stages.core.io import write_csv, write_json
from stages.core.model import Classifier, base_config, encode, save_model
from stages.core.params import load_params
from stages.core.tracking import stage_run
from stages.core.training import fit, fit_options, fit_summary, history_rows


def main() -> None:
    params = load_params()
    sections = {key: params.section(key) for key in ("model", "train")}
    sections["data"] = {"image_shape": params.data.image_shape}
    with stage_run("train", params.tracking.experiment, sections) as run:
        train = pd.read_parquet(layout.split_path("base", "train"))
        val = pd.read_parquet(layout.split_path("base", "val"))
        config = base_config(train, params.model, params.data)
        torch.manual_seed(params.train.seed)
        model = Classifier(config)
        n_parameters = count_parameters(model)
        run.log_metrics({"parameters": n_parameters})
        print(f"train: {config.arch} with {n_parameters:,} parameters")
        options = fit_options(params.section("train"))
        result = fit(model, encode(train, config), encode(val, config), options, run.log_epoch)
        save_model(layout.BASE_MODEL, model, config)
        summary = fit_summary(result)
        write_json(layout.TRAIN_METRICS, summary | {"parameters": n_parameters})
        write_csv(layout.TRAIN_PLOT, pd.DataFrame(history_rows(result)))
        run.log_metrics({f"best_{k}": v for k, v in summary.items()})
        run.log_artifacts(layout.BASE_MODEL, layout.TRAIN_PLOT)
    print(f"train: val accuracy {summary['val_accuracy']:.3f} at epoch {summary['best_epoch']}")


if __name__ == "__main__":
    run_stage("train", main)
