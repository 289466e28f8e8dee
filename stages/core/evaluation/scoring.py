"""Evaluation: each model scored on its test split, the from-scratch and classical baselines
over shot draws, the metrics file's blocks, the gates, and MLflow's classifier evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.core.common.schema import LABEL
from stages.core.engine.inference import predict_proba
from stages.core.modeling.model import Classifier, ModelConfig, encode


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
