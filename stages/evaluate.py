"""Stage evaluate: score both models and the baselines on the test splits, then gate.
-> metrics/evaluate.json, plots/confusion.csv, reports/evaluation.md."""

import sys

import pandas as pd

from stages.core import layout
from stages.core.cli import run_stage
from stages.core.data import LABEL
from stages.core.errors import GateError
from stages.core.evaluation import (
    classical_baseline,
    compare_on_draws,
    failed_gates,
    predictions,
    render_report,
    scores,
    summarize_draws,
)
from stages.core.finetuning import sample_shots
from stages.core.io import write_csv, write_json, write_text
from stages.core.model import load_model
from stages.core.params import load_params
from stages.core.splitting import PARTS
from stages.core.tracking import stage_run


def main() -> None:
    params = load_params()
    sections = {key: params.section(key) for key in ("evaluate", "finetune", "model")}
    with stage_run("evaluate", params.tracking.experiment, sections) as run:
        base_test = pd.read_parquet(layout.split_path("base", "test"))
        target = {part: pd.read_parquet(layout.split_path("target", part)) for part in PARTS}
        base, base_config = load_model(layout.BASE_MODEL)
        tuned, tuned_config = load_model(layout.FINETUNED_MODEL)
        draws = compare_on_draws(base, base_config, (tuned, tuned_config), target, params)
        shots = sample_shots(target["train"], params.finetune.shots_per_class, params.finetune.seed)
        tuned_pairs = predictions(tuned, tuned_config, target["test"])
        metrics = {
            "base": scores(predictions(base, base_config, base_test)),
            "finetuned": draws[0]["finetuned"],
            "scratch": draws[0]["scratch"],
            "sklearn": classical_baseline(shots, target["test"], tuned_config.feature_names),
            "transfer_gain": round(
                draws[0]["finetuned"]["accuracy"] - draws[0]["scratch"]["accuracy"], 6
            ),
            "transfer": summarize_draws(draws),
        }
        if set(target["test"][LABEL]) <= set(base_config.classes):
            metrics["zero_shot"] = scores(predictions(base, base_config, target["test"]))
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
    run_stage("evaluate", main, sys.argv[1:])
