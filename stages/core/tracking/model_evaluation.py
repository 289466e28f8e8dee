"""MLflow's own evaluation of a registered model, run where MLflow runs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.common.schema import LABEL
from stages.core.evaluation.metrics import (
    roc_auc_ovr,
)


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

    from stages.core.common.digests import dvc_md5

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
    """``log_classifier_evaluation`` of the model version that
    stages.core.tracking.registry.register just made, run where MLflow runs
    (``run.send(evaluate_registered, ...)``)."""
    recorder.activate()
    name, version = recorder.registered
    test = pd.read_parquet(test_path)
    log_classifier_evaluation(
        f"models:/{name}/{version}", test, features, proba, classes, test_path
    )
