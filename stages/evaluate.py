"""Stage evaluate: score both models and the baselines on the test splits, then gate.
-> metrics/evaluate.json, plots/{confusion,roc,precision_recall}.csv, plots/per_class/,
reports/evaluation.md, reports/figures/."""

from stages.core.common.warm_start import run_stage_warm
from stages.core.tracking.runs import start_worker

# First, before the imports below: a warm server, when one runs, takes the stage over
# (stages/core/common/warm_start.py); else MLflow's worker process starts and imports mlflow
# (and what logging the model needs) on another core meanwhile.
if __name__ == "__main__":
    run_stage_warm()
    start_worker("stages.core.tracking.model_evaluation", "stages.core.tracking.serving:prepare")


import pandas as pd

from stages.core.common import layout
from stages.core.common.cli import run_as_script
from stages.core.common.errors import GateError
from stages.core.common.io import write_csv, write_json, write_text
from stages.core.common.params import load_params
from stages.core.common.schema import LABEL, TEXT
from stages.core.data.splitting import PARTS
from stages.core.evaluation.baselines import compare_on_draws
from stages.core.evaluation.figures import draw_figures
from stages.core.evaluation.gates import gates
from stages.core.evaluation.metrics import per_class_scores
from stages.core.evaluation.report import render_report
from stages.core.evaluation.results import evaluation_metrics, plot_files
from stages.core.evaluation.scoring import predictions, score_model
from stages.core.evaluation.text_scoring import (
    checkpoint_draws,
    compare_text_draws,
    confident_mistakes,
    score_text_model,
)
from stages.core.modeling.model import load_model
from stages.core.modeling.text import is_text_model, load_text_model
from stages.core.modeling.text_training import tokenize_rows
from stages.core.tracking.model_evaluation import evaluate_registered
from stages.core.tracking.registry import promote, register
from stages.core.tracking.runs import stage_run


def main() -> None:
    params = load_params()
    sections = {key: params.section(key) for key in ("evaluate", "finetune", "model")}
    with stage_run("evaluate", params.tracking.experiment, sections, pipeline_params=params) as run:
        test_path = layout.split_path("target", "test")
        base_test = pd.read_parquet(layout.split_path("base", "test"))
        for role in ("base", "target"):
            run.log_dataset(layout.split_path(role, "test"), "test")
        target = {part: pd.read_parquet(layout.split_path("target", part)) for part in PARTS}
        if is_text_model(layout.FINETUNED_MODEL):
            return evaluate_text(params, run, base_test, target)
        base, base_config = load_model(layout.BASE_MODEL)
        tuned, tuned_config = load_model(layout.FINETUNED_MODEL)
        tuned_scored = score_model(tuned, tuned_config, target["test"])
        classes = tuned_config.classes
        # The fine-tuned model becomes a registry version now, and MLflow evaluates it while
        # the comparison below runs; the gates decide its aliases at the end.
        registered_model = params.tracking.registered_model
        run.send(register, layout.FINETUNED_MODEL, test_path, registered_model)
        run.send(
            evaluate_registered, test_path, tuned_config.feature_names, tuned_scored.proba, classes
        )
        draws = compare_on_draws(base, base_config, (tuned, tuned_config), target, params)
        zero_shot = None
        if set(target["test"][LABEL]) <= set(base_config.classes):
            zero_shot = predictions(base, base_config, target["test"])
        metrics = evaluation_metrics(
            base=score_model(base, base_config, base_test),
            finetuned=tuned_scored,
            draws=draws,
            zero_shot=zero_shot,
            params=params.evaluate,
        )
        checked = gates(metrics, params.evaluate)
        write_json(layout.EVALUATE_METRICS, metrics)

        per_class = {
            "base": metrics["base"]["per_class"],
            "finetuned": metrics["finetuned"]["per_class"],
            "scratch": per_class_scores(draws[0].scratch, classes),
        }
        finish(run, params, metrics, checked, tuned_scored, per_class)


def finish(run, params, metrics, checked, tuned_scored, per_class, mistakes=None) -> None:
    """The evaluation's files, figures, report and MLflow records, then the registry's aliases
    and the gates' verdict (raised as a GateError after the registry has it)."""
    if True:  # indented as the stage run's body it was; shared by feature and text models
        for path, frame in plot_files(tuned_scored, per_class).items():
            write_csv(path, frame)
        histories = {
            "train (base domain)": pd.read_csv(layout.TRAIN_PLOT),
            "finetune (target shots)": pd.read_csv(layout.FINETUNE_PLOT),
        }
        figures = draw_figures(
            layout.FIGURES,
            tuned_scored.pairs,
            tuned_scored.proba,
            tuned_scored.classes,
            histories={name: frame for name, frame in histories.items() if len(frame)},
            recalls={m: {c: row["recall"] for c, row in r.items()} for m, r in per_class.items()},
        )
        links = {caption: path.relative_to(layout.EVALUATION_REPORT.parent).as_posix()
                 for caption, path in figures.items()}  # fmt: skip
        report = render_report(metrics, checked, params, links, mistakes)
        write_text(layout.EVALUATION_REPORT, report)

        run.log_metrics(metrics, parent=True)
        run.log_artifacts(layout.EVALUATION_REPORT, layout.FIGURES, parent=True)
        run.log_artifacts(
            layout.CONFUSION_PLOT, layout.ROC_PLOT, layout.PRECISION_RECALL_PLOT, folder="plots"
        )
        run.log_artifacts(layout.PER_CLASS_PLOTS, folder="plots/per_class")
        run.log_artifacts("dvc.lock", parent=True)  # as of this stage's start
        print(report)
        failures = [gate.failure() for gate in checked if not gate.passed]
        run.send(promote, metrics["finetuned"]["accuracy"], failures)
        if failures:
            # Raised inside the run: it ends FAILED, after the registry has the gates' verdict.
            raise GateError("\n".join(failures))


def evaluate_text(params, run, base_test: pd.DataFrame, target: dict) -> None:
    """The text models (model.arch hf): scored on the raw test texts, against the same
    architecture from random weights over the draws and TF-IDF + logistic regression on the
    same rows. A one-domain dataset (or an untrained base) has no zero-shot row and no
    base-accuracy gate."""
    test_path = layout.split_path("target", "test")
    base = load_text_model(layout.BASE_MODEL)
    tuned, tokenizer, tuned_config = load_text_model(layout.FINETUNED_MODEL)
    tuned_scored = score_text_model(tuned, tokenizer, tuned_config, target["test"])
    run.send(register, layout.FINETUNED_MODEL, test_path, params.tracking.registered_model)
    # MLflow's evaluation of the version, on the test split's one text column (the model's
    # input is one unnamed string column).
    classes = tuned_config.classes
    run.send(evaluate_registered, test_path, [TEXT], tuned_scored.proba, classes)
    draws = compare_text_draws(base, tuned_scored, target, params)
    base_trained = params.train.objective == "classify"  # none, mlm, clm: no trained head
    zero_shot = None
    covered = set(target["test"][LABEL]) <= set(base[2].classes)
    if base_trained and not params.data.single_domain and covered:
        zero_shot = score_text_model(*base, target["test"]).pairs
    # Domain-adaptive pretraining of a downloaded checkpoint: did it help? The checkpoint as
    # it was, fine-tuned on the same shots, is the control.
    adapted = params.train.objective in ("mlm", "clm") and params.model.pretrained is not None
    metrics = evaluation_metrics(
        base=score_text_model(*base, base_test) if base_trained else None,
        finetuned=tuned_scored,
        draws=draws,
        zero_shot=zero_shot,
        params=params.evaluate,
        checkpoint=checkpoint_draws(tuned_config, target, params) if adapted else None,
    )
    mistakes = confident_mistakes(tuned_scored, target["test"][TEXT].tolist())
    metrics["truncated_rows"] = tokenize_rows(tokenizer, target["test"], tuned_config).truncated
    checked = gates(metrics, params.evaluate, base_gate=not params.data.single_domain)
    write_json(layout.EVALUATE_METRICS, metrics)
    per_class = {key: metrics[key]["per_class"] for key in ("base", "finetuned") if key in metrics}
    per_class["scratch"] = per_class_scores(draws[0].scratch, classes)
    finish(run, params, metrics, checked, tuned_scored, per_class, mistakes)


if __name__ == "__main__":
    run_as_script("evaluate", main)
