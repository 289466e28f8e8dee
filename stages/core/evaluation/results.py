"""The evaluate stage's metrics block and the data of its DVC plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.core.common import layout
from stages.core.common.params import EvaluateParams
from stages.core.evaluation.baselines import Draw, draw_accuracies, summarize_draws
from stages.core.evaluation.metrics import (
    bootstrap_intervals,
    detailed_scores,
    micro_curves,
    scores,
)
from stages.core.evaluation.scoring import Scored


def evaluation_metrics(
    base: Scored | None,
    finetuned: Scored,
    draws: list[Draw],
    zero_shot: pd.DataFrame | None,
    params: EvaluateParams,
    checkpoint: list[pd.DataFrame] | None = None,
) -> dict:
    """The content of metrics/evaluate.json: one block per model (``scratch`` and ``sklearn``
    on the shipped draw), the transfer gain on the shipped draw and its summary over all draws,
    and ``versus_sklearn``: the fine-tuned model's gain over scikit-learn's baseline fitted on
    the same shots, summarised over the draws the same way.

    Every block holds :func:`scores` and bootstrap intervals of accuracy, recall_macro and
    f1_macro (seeded, the same resamples for models scored on the same rows); ``base`` and
    ``finetuned`` add the per-class and probability figures of :func:`detailed_scores`.
    ``base`` None (a text base model with an untrained head, ``train.objective: none``) leaves
    the base block out. ``checkpoint`` (a downloaded checkpoint's predictions over the same
    draws, fine-tuned without this run's pretraining) adds its block and
    ``adaptive_pretraining``: the fine-tuned model's gain over it, summarised like ``transfer``.
    """

    def block(pairs: pd.DataFrame) -> dict:
        return scores(pairs) | bootstrap_intervals(
            pairs, params.bootstrap_resamples, params.bootstrap_seed
        )

    def detailed(scored: Scored) -> dict:
        return block(scored.pairs) | detailed_scores(scored.pairs, scored.proba, scored.classes)

    finetuned_accuracy = draw_accuracies(draws, "finetuned")
    scratch_accuracy = draw_accuracies(draws, "scratch")
    metrics = {
        **({"base": detailed(base)} if base is not None else {}),
        "finetuned": detailed(finetuned),
        "scratch": block(draws[0].scratch),
        "sklearn": block(draws[0].sklearn),
        "transfer_gain": round(finetuned_accuracy[0] - scratch_accuracy[0], 6),
        "transfer": summarize_draws(finetuned_accuracy, scratch_accuracy),
        "versus_sklearn": summarize_draws(
            finetuned_accuracy, draw_accuracies(draws, "sklearn"), "sklearn"
        ),
    }
    if zero_shot is not None:
        metrics["zero_shot"] = block(zero_shot)
    if checkpoint is not None:
        checkpoint_accuracy = [scores(pairs)["accuracy"] for pairs in checkpoint]
        metrics["checkpoint"] = block(checkpoint[0])
        metrics["adaptive_pretraining"] = summarize_draws(
            finetuned_accuracy, checkpoint_accuracy, "checkpoint"
        )
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
