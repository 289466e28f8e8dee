"""Stage evaluate: score both models and the baselines on the test splits, then gate.
-> metrics/evaluate.json, plots/confusion.csv, reports/evaluation.md."""

import pandas as pd

from stages.core import layout
from stages.core.cli import run_stage
from stages.core.data import LABEL
from stages.core.errors import GateError
from stages.core.evaluation import (
    classical_baseline,
    failed_gates,
    predictions,
    render_report,
    scores,
    train_scratch,
)
from stages.core.finetuning import few_shot_options, sample_shots
from stages.core.io import write_csv, write_json, write_text
from stages.core.model import load_model
from stages.core.params import load_params
from stages.core.tracking import stage_run


def main() -> None:
    params = load_params()
    sections = {key: params.section(key) for key in ("evaluate", "finetune", "model")}
    with stage_run("evaluate", params.tracking.experiment, sections) as run:
        split = {
            (role, part): pd.read_parquet(layout.split_path(role, part))
            for role in ("base", "target")
            for part in ("train", "val", "test")
        }
        base, base_config = load_model(layout.BASE_MODEL)
        tuned, tuned_config = load_model(layout.FINETUNED_MODEL)
        target_test = split["target", "test"]
        shots = sample_shots(
            split["target", "train"], params.finetune.shots_per_class, params.finetune.seed
        )
        tuned_pairs = predictions(tuned, tuned_config, target_test)
        scratch, scratch_config = train_scratch(
            shots,
            split["target", "val"],
            tuned_config,
            params.model.scaling,
            few_shot_options(params),
        )
        metrics = {
            "base": scores(predictions(base, base_config, split["base", "test"])),
            "finetuned": scores(tuned_pairs),
            "scratch": scores(predictions(scratch, scratch_config, target_test)),
            "sklearn": classical_baseline(shots, target_test, tuned_config.feature_names),
        }
        if set(target_test[LABEL]) <= set(base_config.classes):
            metrics["zero_shot"] = scores(predictions(base, base_config, target_test))
        metrics["transfer_gain"] = round(
            metrics["finetuned"]["accuracy"] - metrics["scratch"]["accuracy"], 6
        )
        failures = failed_gates(metrics, params.evaluate)
        write_json(layout.EVALUATE_METRICS, metrics)
        write_csv(layout.CONFUSION_PLOT, tuned_pairs)
        report = render_report(metrics, params.finetune.shots_per_class, failures)
        write_text(layout.EVALUATION_REPORT, report)
        run.log_metrics(metrics)
        run.log_artifacts(layout.EVALUATION_REPORT, layout.CONFUSION_PLOT)
        print(report)
        if failures:
            raise GateError(failures[0])


if __name__ == "__main__":
    run_stage("evaluate", main)
