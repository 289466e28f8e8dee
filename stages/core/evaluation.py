"""Evaluation: scores of each model, the from-scratch and classical baselines, the gates."""

from __future__ import annotations

import pandas as pd
import torch

from stages.core.data import LABEL
from stages.core.model import Classifier, ModelConfig, encode, fit_scaling
from stages.core.params import EvaluateParams
from stages.core.training import FitOptions, fit, predict


def predictions(model: Classifier, config: ModelConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """``actual`` and ``predicted`` class labels of ``model`` on ``frame``."""
    x, _ = encode(frame, config)
    predicted = predict(model, x).numpy()
    return pd.DataFrame(
        {"actual": frame[LABEL].to_numpy(), "predicted": [config.classes[i] for i in predicted]}
    )


def scores(pairs: pd.DataFrame) -> dict:
    """Accuracy and macro F1 of (actual, predicted) pairs."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": round(float(accuracy_score(pairs.actual, pairs.predicted)), 6),
        "f1_macro": round(float(f1_score(pairs.actual, pairs.predicted, average="macro")), 6),
    }


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


def classical_baseline(shots: pd.DataFrame, test: pd.DataFrame, features: list[str]) -> dict:
    """Scaled logistic regression on the same shots, scored on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(shots[features].to_numpy(), shots[LABEL].to_numpy())
    predicted = classifier.predict(test[features].to_numpy())
    return scores(pd.DataFrame({"actual": test[LABEL].to_numpy(), "predicted": predicted}))


def failed_gates(metrics: dict, params: EvaluateParams) -> list[str]:
    """One line per gate the metrics miss."""
    failures = []
    if metrics["base"]["accuracy"] < params.min_base_accuracy:
        failures.append(
            f"evaluate.min_base_accuracy: base.accuracy {metrics['base']['accuracy']:.4f} "
            f"< {params.min_base_accuracy}"
        )
    if metrics["transfer_gain"] < params.min_transfer_gain:
        failures.append(
            f"evaluate.min_transfer_gain: finetuned - scratch accuracy "
            f"{metrics['transfer_gain']:+.4f} < {params.min_transfer_gain}"
        )
    return failures


def render_report(metrics: dict, shots_per_class: int, failures: list[str]) -> str:
    """A short Markdown summary of the evaluation."""
    rows = [
        ("base", "base model", "base-domain test"),
        ("zero_shot", "base model, no adaptation", "target-domain test"),
        ("finetuned", f"fine-tuned on {shots_per_class} shots/class", "target-domain test"),
        ("scratch", f"same net from scratch on the {shots_per_class} shots", "target-domain test"),
        ("sklearn", "logistic regression on the same shots", "target-domain test"),
    ]
    lines = [
        "# Evaluation",
        "",
        "| model | trained as | scored on | accuracy | macro F1 |",
        "|---|---|---|---|---|",
    ]
    for key, what, where in rows:
        found = metrics.get(key, {})
        acc = f"{found['accuracy']:.4f}" if "accuracy" in found else "n/a"
        f1 = f"{found['f1_macro']:.4f}" if "f1_macro" in found else "n/a"
        lines.append(f"| {key} | {what} | {where} | {acc} | {f1} |")
    lines += ["", f"Transfer gain (finetuned - scratch): {metrics['transfer_gain']:+.4f}", ""]
    lines += ["Gates: all passed." if not failures else "Gates failed:"]
    lines += [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"
