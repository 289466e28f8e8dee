"""Evaluation: each model scored on its test split, the from-scratch and classical baselines
over shot draws, the metrics file's blocks, the gates, and MLflow's classifier evaluation."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core import layout
from stages.core.data import LABEL
from stages.core.finetuning import few_shot_options, fine_tune, sample_shots
from stages.core.metrics import (
    bootstrap_intervals,
    detailed_scores,
    mean_interval,
    micro_curves,
    roc_auc_ovr,
    scores,
)
from stages.core.model import Classifier, ModelConfig, encode, fit_scaling
from stages.core.params import EvaluateParams, Params
from stages.core.training import FitOptions, fit, predict_proba


@dataclass(frozen=True)
class Scored:
    """A model's predictions on a split: ``pairs`` (``actual``, ``predicted`` labels per row)
    and ``proba`` (class probabilities, one column per class of ``classes``, in that order)."""

    pairs: pd.DataFrame
    proba: np.ndarray
    classes: list


def score_model(model: Classifier, config: ModelConfig, frame: pd.DataFrame) -> Scored:
    """Predicted labels and class probabilities of ``model`` on ``frame``, from one forward pass."""
    x, _ = encode(frame, config)
    proba = predict_proba(model, x).numpy()
    predicted = np.asarray(config.classes, dtype=object)[proba.argmax(axis=1)]
    pairs = pd.DataFrame({"actual": frame[LABEL].to_numpy(), "predicted": predicted.tolist()})
    return Scored(pairs=pairs, proba=proba, classes=list(config.classes))


def predictions(model: Classifier, config: ModelConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """``actual`` and ``predicted`` class labels of ``model`` on ``frame``."""
    return score_model(model, config, frame).pairs


def train_scratch(
    shots: pd.DataFrame,
    val: pd.DataFrame,
    template: ModelConfig,
    scaling: str,
    options: FitOptions,
) -> tuple[Classifier, ModelConfig]:
    """The same architecture, trained from random weights on the same shots and options."""
    x = shots[template.feature_names].to_numpy()
    mean, std = fit_scaling(x, scaling)
    config = template.replace(mean=mean, std=std, trained_on={"domain": "shots only"})
    torch.manual_seed(options.seed)
    model = Classifier(config)
    fit(model, encode(shots, config), encode(val, config), options)
    return model, config


def classical_baseline(
    shots: pd.DataFrame, test: pd.DataFrame, features: list[str]
) -> pd.DataFrame:
    """Predictions on ``test`` of a scaled logistic regression fitted on the same shots."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(shots[features].to_numpy(), shots[LABEL].to_numpy())
    predicted = classifier.predict(test[features].to_numpy())
    return pd.DataFrame({"actual": test[LABEL].to_numpy(), "predicted": predicted})


@dataclass(frozen=True)
class Draw:
    """One draw of the shots: its seed and the test predictions of the model fine-tuned on it
    and of the same network trained from scratch on it."""

    seed: int
    finetuned: pd.DataFrame
    scratch: pd.DataFrame


def compare_on_draws(
    base: Classifier,
    base_config: ModelConfig,
    shipped: tuple[Classifier, ModelConfig],
    target: dict[str, pd.DataFrame],
    params: Params,
) -> list[Draw]:
    """Fine-tuning vs training from scratch, on the same shots, for ``evaluate.draws`` draws.

    Draw ``i`` samples its shots from ``target["train"]`` with seed ``finetune.seed + i``;
    draw 0 is the shipped fine-tuned model's own draw, so it is scored rather than retrained.
    One draw of five labelled examples per class is noisy; the mean over draws is what the
    transfer gate reads.
    """
    draws = []
    for i in range(params.evaluate.draws):
        seed = params.finetune.seed + i
        shots = sample_shots(target["train"], params.finetune.shots_per_class, seed)
        if i == 0:
            tuned, tuned_config = shipped
        else:
            tuned, tuned_config, _ = fine_tune(
                base, base_config, shots, target["val"], params, seed
            )
        scratch, scratch_config = train_scratch(
            shots, target["val"], tuned_config, params.model.scaling, few_shot_options(params, seed)
        )
        draws.append(
            Draw(
                seed=seed,
                finetuned=predictions(tuned, tuned_config, target["test"]),
                scratch=predictions(scratch, scratch_config, target["test"]),
            )
        )
    return draws


def draw_accuracies(draws: list[Draw]) -> tuple[list[float], list[float]]:
    """The fine-tuned and the scratch accuracy of each draw, in draw order."""
    finetuned = [scores(d.finetuned)["accuracy"] for d in draws]
    return finetuned, [scores(d.scratch)["accuracy"] for d in draws]


def summarize_draws(finetuned: list[float], scratch: list[float]) -> dict:
    """Transfer gain (fine-tuned minus scratch accuracy) over the draws: the means, the worst
    draw, and a 95% t-interval for the mean gain (null with a single draw)."""
    gains = [f - s for f, s in zip(finetuned, scratch, strict=True)]
    low, high = mean_interval(gains)
    return {
        "draws": len(gains),
        "finetuned_mean": round(sum(finetuned) / len(gains), 6),
        "scratch_mean": round(sum(scratch) / len(gains), 6),
        "gain_mean": round(sum(gains) / len(gains), 6),
        "gain_min": round(min(gains), 6),
        "gain_ci95_low": low,
        "gain_ci95_high": high,
    }


def evaluation_metrics(
    base: Scored,
    finetuned: Scored,
    draws: list[Draw],
    sklearn: pd.DataFrame,
    zero_shot: pd.DataFrame | None,
    params: EvaluateParams,
) -> dict:
    """The content of metrics/evaluate.json: one block per model, the transfer gain on the
    shipped draw and its summary over all draws.

    Every block holds :func:`scores` and bootstrap intervals of accuracy, recall_macro and
    f1_macro (seeded, the same resamples for models scored on the same rows); ``base`` and
    ``finetuned`` add the per-class and probability figures of :func:`detailed_scores`.
    """

    def block(pairs: pd.DataFrame) -> dict:
        return scores(pairs) | bootstrap_intervals(
            pairs, params.bootstrap_resamples, params.bootstrap_seed
        )

    def detailed(scored: Scored) -> dict:
        return block(scored.pairs) | detailed_scores(scored.pairs, scored.proba, scored.classes)

    finetuned_accuracy, scratch_accuracy = draw_accuracies(draws)
    metrics = {
        "base": detailed(base),
        "finetuned": detailed(finetuned),
        "scratch": block(draws[0].scratch),
        "sklearn": block(sklearn),
        "transfer_gain": round(finetuned_accuracy[0] - scratch_accuracy[0], 6),
        "transfer": summarize_draws(finetuned_accuracy, scratch_accuracy),
    }
    if zero_shot is not None:
        metrics["zero_shot"] = block(zero_shot)
    return metrics


def plot_files(finetuned: Scored, per_class: dict[str, dict]) -> dict[Path, pd.DataFrame]:
    """The data of the DVC plots, by path: the fine-tuned model's test predictions (confusion),
    its micro-averaged ROC and precision-recall curves, and each model's per-class scores."""
    roc, precision_recall = micro_curves(
        finetuned.pairs["actual"].to_numpy(), finetuned.proba, finetuned.classes
    )
    files = {
        layout.CONFUSION_PLOT: finetuned.pairs,
        layout.ROC_PLOT: roc,
        layout.PRECISION_RECALL_PLOT: precision_recall,
    }
    for model, rows in per_class.items():
        frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("class").reset_index()
        files[layout.PER_CLASS_PLOTS / f"{model}.csv"] = frame
    return files


@dataclass(frozen=True)
class Gate:
    """One quality gate: the param that sets it, the metric it reads, and the outcome."""

    key: str
    metric: str
    value: float
    threshold: float | None  # None: the gate is off
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.threshold is None or self.value >= self.threshold

    def failure(self) -> str:
        """The one line a failed gate prints: param, metric, value and threshold."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"evaluate.{self.key}: {self.metric}{detail} {self.value:.4f} < {self.threshold}"


def gates(metrics: dict, params: EvaluateParams) -> list[Gate]:
    """Every gate, in a fixed order, with the value it reads."""
    transfer, tuned = metrics["transfer"], metrics["finetuned"]
    return [
        Gate("min_base_accuracy", "base.accuracy", metrics["base"]["accuracy"],
             params.min_base_accuracy),
        Gate("min_transfer_gain", "transfer.gain_mean", transfer["gain_mean"],
             params.min_transfer_gain,
             f"finetuned - scratch accuracy, mean over {transfer['draws']} draws"),
        Gate("min_class_recall", "finetuned.worst_class_recall", tuned["worst_class_recall"],
             params.min_class_recall, f"class {tuned['worst_class']}"),
    ]  # fmt: skip


def failed_gates(metrics: dict, params: EvaluateParams) -> list[str]:
    """One line per gate the metrics miss."""
    return [gate.failure() for gate in gates(metrics, params) if not gate.passed]


def log_classifier_evaluation(
    model: Callable[[pd.DataFrame], np.ndarray] | str,
    test: pd.DataFrame,
    features: list[str],
    proba: np.ndarray,
    classes: list,
    source: str | None = None,
) -> dict[str, float]:
    """``mlflow.models.evaluate`` (classifier) of ``model`` on ``test``, into the active run.

    ``model`` is what MLflow accepts: a callable from a feature frame to labels, or a model
    URI. MLflow computes no ROC AUC or log loss for a model that is not scikit-learn's, so
    ``roc_auc`` (one-vs-rest) and ``log_loss`` come as extra metrics from ``proba``, the
    model's class probabilities for the rows of ``test`` (columns in ``classes`` order).
    Explainability (SHAP) is off. With ``source``, the file ``test`` was read from, MLflow
    records the data as that dataset, its digest DVC's md5. Returns MLflow's metrics.
    """
    import mlflow
    from sklearn.metrics import log_loss

    from stages.core.lineage import dvc_md5

    def rows(targets: pd.Series) -> np.ndarray:
        # MLflow hands metrics the targets by row position (and first tries a single row).
        return proba[targets.index.to_numpy()]

    def roc_auc(targets: pd.Series) -> float:
        area = roc_auc_ovr(targets.to_numpy(), rows(targets), classes)
        return float("nan") if area is None else area  # None on MLflow's one-row trial

    def cross_entropy(targets: pd.Series) -> float:
        return float(log_loss(targets, rows(targets), labels=classes))

    extra = [
        mlflow.models.make_metric(eval_fn=roc_auc, greater_is_better=True, name="roc_auc"),
        mlflow.models.make_metric(eval_fn=cross_entropy, greater_is_better=False, name="log_loss"),
    ]
    chatty = logging.getLogger("mlflow.models.evaluation")
    level = chatty.level
    # Its INFO lines, and a warning that integer labels "look like" no model type, are noise
    # on every run; a failure still raises.
    chatty.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            # "Source can be interpreted in multiple ways": a local file, either way.
            warnings.filterwarnings("ignore", message="The specified dataset source")
            data = test[[*features, LABEL]].reset_index(drop=True)
            targets = LABEL
            if source is not None:
                data = mlflow.data.from_pandas(
                    data, source, LABEL, Path(source).stem, digest=dvc_md5(source)
                )
                targets = None  # the dataset names them
            result = mlflow.models.evaluate(
                model,
                data,
                targets=targets,
                feature_names=features,
                model_type="classifier",
                evaluator_config={
                    "log_model_explainability": False,
                    "label_list": classes,
                    "average": "macro",
                },
                extra_metrics=extra,
            )
    finally:
        chatty.setLevel(level)
    return dict(result.metrics)


def evaluate_registered(recorder, test_path: str, features: list, proba, classes: list) -> None:
    """``log_classifier_evaluation`` of the model version that stages.core.registry.register
    just made, run where MLflow runs (``run.send(evaluate_registered, ...)``)."""
    recorder.activate()
    name, version = recorder.registered
    test = pd.read_parquet(test_path)
    log_classifier_evaluation(
        f"models:/{name}/{version}", test, features, proba, classes, test_path
    )
