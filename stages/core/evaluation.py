"""Evaluation: scores of each model, the from-scratch and classical baselines, the gates."""

from __future__ import annotations

import pandas as pd
import torch

from stages.core.data import LABEL
from stages.core.finetuning import few_shot_options, fine_tune, sample_shots
from stages.core.model import Classifier, ModelConfig, encode, fit_scaling
from stages.core.params import EvaluateParams, Params
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


def compare_on_draws(
    base: Classifier,
    base_config: ModelConfig,
    shipped: tuple[Classifier, ModelConfig],
    target: dict[str, pd.DataFrame],
    params: Params,
) -> list[dict]:
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
            {
                "seed": seed,
                "finetuned": scores(predictions(tuned, tuned_config, target["test"])),
                "scratch": scores(predictions(scratch, scratch_config, target["test"])),
            }
        )
    return draws


def summarize_draws(draws: list[dict]) -> dict:
    """Mean and worst transfer gain (fine-tuned minus scratch accuracy) over the draws."""
    finetuned = [d["finetuned"]["accuracy"] for d in draws]
    scratch = [d["scratch"]["accuracy"] for d in draws]
    gains = [f - s for f, s in zip(finetuned, scratch, strict=True)]
    return {
        "draws": len(draws),
        "finetuned_mean": round(sum(finetuned) / len(draws), 6),
        "scratch_mean": round(sum(scratch) / len(draws), 6),
        "gain_mean": round(sum(gains) / len(draws), 6),
        "gain_min": round(min(gains), 6),
    }


def failed_gates(metrics: dict, params: EvaluateParams) -> list[str]:
    """One line per gate the metrics miss."""
    failures = []
    if metrics["base"]["accuracy"] < params.min_base_accuracy:
        failures.append(
            f"evaluate.min_base_accuracy: base.accuracy {metrics['base']['accuracy']:.4f} "
            f"< {params.min_base_accuracy}"
        )
    transfer = metrics["transfer"]
    if transfer["gain_mean"] < params.min_transfer_gain:
        failures.append(
            f"evaluate.min_transfer_gain: finetuned - scratch accuracy, mean over "
            f"{transfer['draws']} draws, {transfer['gain_mean']:+.4f} < {params.min_transfer_gain}"
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
    transfer = metrics["transfer"]
    lines += [
        "",
        f"Transfer gain (finetuned - scratch, same shots): {metrics['transfer_gain']:+.4f}",
        "",
        f"Over {transfer['draws']} draws of the shots: "
        f"fine-tuned {transfer['finetuned_mean']:.4f}, scratch {transfer['scratch_mean']:.4f}, "
        f"gain {transfer['gain_mean']:+.4f} "
        f"(worst draw {transfer['gain_min']:+.4f}).",
        "",
    ]
    lines += ["Gates: all passed." if not failures else "Gates failed:"]
    lines += [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"
