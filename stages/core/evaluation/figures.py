"""The evaluation's pictures as PNGs (matplotlib, Agg): fixed size and DPI and no metadata, so the
same inputs give the same bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stages.core.common.io import write_atomic
from stages.core.evaluation.metrics import (
    calibration_bins,
    confidence_and_correct,
    expected_calibration_error,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


DPI = 100


SIZE = (9.0, 4.5)  # inches: 900 x 450 pixels


CONFUSION_FIGURE = "confusion_finetuned.png"


TRAINING_FIGURE = "training_curves.png"


PER_CLASS_FIGURE = "per_class_recall.png"


RELIABILITY_FIGURE = "reliability_finetuned.png"


def new_figure(ncols: int = 1, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    """A figure of the fixed size with a grid of axes, without pyplot's global state.

    Fixed margins rather than a layout engine: the engines double the drawing time.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE, dpi=DPI)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.88, wspace=0.25, hspace=0.3)
    return figure, axes.ravel()


def save_png(figure: Figure, path: Path | str) -> Path:
    """Write ``figure`` as a PNG of exactly SIZE x DPI pixels, with no Software text chunk
    (PNGs carry no date), atomically."""
    return write_atomic(
        path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    )


def confusion_figure(pairs: pd.DataFrame, classes: Sequence, title: str) -> Figure:
    """Confusion matrix of (``actual``, ``predicted``) pairs: counts, and rows normalised to the
    share of each true class."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, (counts, shares) = new_figure(ncols=2)
    for ax, normalize, fmt, name in (
        (counts, None, "d", "counts"),
        (shares, "true", ".2f", "share of each true class"),
    ):
        ConfusionMatrixDisplay.from_predictions(
            pairs["actual"],
            pairs["predicted"],
            labels=list(classes),
            normalize=normalize,
            values_format=fmt,
            colorbar=False,
            cmap="Blues",
            ax=ax,
            text_kw={"fontsize": 7},
        )
        ax.set_title(name, fontsize=10)
    figure.suptitle(title)
    return figure


def training_curves_figure(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Loss (train and val) and val accuracy per epoch, one column per training run."""
    figure, axes = new_figure(ncols=len(histories), nrows=2)
    for column, (name, history) in enumerate(histories.items()):
        loss, accuracy = axes[column], axes[len(histories) + column]
        loss.plot(history["epoch"], history["train_loss"], label="train loss")
        loss.plot(history["epoch"], history["val_loss"], label="val loss")
        loss.set_title(name, fontsize=10)
        loss.set_ylabel("cross-entropy")
        loss.legend(fontsize=8)
        accuracy.plot(history["epoch"], history["val_accuracy"], color="tab:green")
        accuracy.set_ylim(0, 1.02)
        accuracy.set_xlabel("epoch")
        accuracy.set_ylabel("val accuracy")
        for ax in (loss, accuracy):
            ax.grid(alpha=0.3)
    return figure


def per_class_recall_figure(
    recalls: Mapping[str, Mapping[str, float]], classes: Sequence
) -> Figure:
    """Grouped bars: each model's recall on each class (``recalls[model][label]``)."""
    figure, (ax,) = new_figure()
    labels = [str(c) for c in classes]
    width = 0.8 / len(recalls)
    positions = np.arange(len(labels))
    for i, (model, by_class) in enumerate(recalls.items()):
        values = [by_class.get(label, np.nan) for label in labels]
        ax.bar(positions + (i - (len(recalls) - 1) / 2) * width, values, width, label=model)
    ax.set_xticks(positions, labels)
    ax.set_xlabel("class")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=len(recalls))
    ax.set_title("Recall per class (base: base-domain test; the others: target-domain test)")
    return figure


def reliability_figure(bins: pd.DataFrame, ece: float, title: str) -> Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin (the diagonal is
    perfect calibration), and how many rows fall in each bin."""
    figure, (ax, counts) = new_figure(ncols=2)
    filled = bins[bins["count"] > 0]
    width = float(bins["high"].iloc[0] - bins["low"].iloc[0])
    centres = (bins["low"] + bins["high"]) / 2
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="ideal")
    ax.bar(
        (filled["low"] + filled["high"]) / 2,
        filled["accuracy"],
        width * 0.9,
        alpha=0.7,
        label="accuracy per bin",
    )
    ax.plot(filled["confidence"], filled["accuracy"], "o", color="tab:red", label="bin mean")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {ece:.4f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncols=3)
    counts.bar(centres, bins["count"], width * 0.9, color="tab:grey")
    counts.set_xlim(0, 1)
    counts.set_xlabel("confidence")
    counts.set_ylabel("test rows")
    counts.set_title("rows per bin", fontsize=10)
    figure.suptitle(title)
    return figure


def draw_figures(
    directory: Path | str,
    finetuned: pd.DataFrame,
    proba: np.ndarray,
    classes: Sequence,
    histories: Mapping[str, pd.DataFrame],
    recalls: Mapping[str, Mapping[str, float]],
) -> dict[str, Path]:
    """Draw every picture of the evaluation into ``directory``; returns {caption: path}.

    ``finetuned`` and ``proba``: the fine-tuned model's test predictions and probabilities;
    ``histories``: training runs by name (rows of epoch, losses, val accuracy);
    ``recalls``: each model's recall by class label (as text).
    """
    directory = Path(directory)
    confidence, correct = confidence_and_correct(finetuned["actual"].to_numpy(), proba, classes)
    ece = expected_calibration_error(confidence, correct)
    where = "Fine-tuned model, target-domain test"
    drawn = {
        "Confusion matrix of the fine-tuned model (target-domain test)": (
            CONFUSION_FIGURE,
            confusion_figure(finetuned, classes, where),
        ),
        "Loss and val accuracy per epoch": (TRAINING_FIGURE, training_curves_figure(histories)),
        "Recall per class": (PER_CLASS_FIGURE, per_class_recall_figure(recalls, classes)),
        "Reliability diagram of the fine-tuned model": (
            RELIABILITY_FIGURE,
            reliability_figure(calibration_bins(confidence, correct), ece, where),
        ),
    }
    return {caption: save_png(fig, directory / name) for caption, (name, fig) in drawn.items()}
