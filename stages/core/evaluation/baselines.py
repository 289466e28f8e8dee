"""The baselines the fine-tuned model is compared with: the same net from scratch on the same
shots, over several draws, and scikit-learn's logistic regression."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from stages.core.common.params import Params
from stages.core.common.schema import LABEL
from stages.core.engine.training import FitOptions, fit
from stages.core.evaluation.metrics import (
    mean_interval,
    scores,
)
from stages.core.evaluation.scoring import predictions
from stages.core.modeling.finetuning import few_shot_options, fine_tune, sample_shots
from stages.core.modeling.model import Classifier, ModelConfig, encode, fit_scaling


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
    """One draw of the shots: its seed and the test predictions of the model fine-tuned on it,
    of the same network trained from scratch on it, and of scikit-learn's baseline fitted on
    it (a logistic regression on the features; TF-IDF and one on texts)."""

    seed: int
    finetuned: pd.DataFrame
    scratch: pd.DataFrame
    sklearn: pd.DataFrame


def compare_on_draws(
    base: Classifier,
    base_config: ModelConfig,
    shipped: tuple[Classifier, ModelConfig],
    target: dict[str, pd.DataFrame],
    params: Params,
) -> list[Draw]:
    """Fine-tuning vs training from scratch and vs scikit-learn's logistic regression, on the
    same shots, for ``evaluate.draws`` draws.

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
                sklearn=classical_baseline(shots, target["test"], tuned_config.feature_names),
            )
        )
    return draws


def draw_accuracies(draws: list[Draw], model: str) -> list[float]:
    """The accuracy of ``model`` (``finetuned``, ``scratch`` or ``sklearn``) on each draw, in
    draw order."""
    return [scores(getattr(d, model))["accuracy"] for d in draws]


def summarize_draws(
    finetuned: list[float], scratch: list[float], baseline: str = "scratch"
) -> dict:
    """Transfer gain (fine-tuned minus scratch accuracy) over the draws: the means, the worst
    draw, and a 95% t-interval for the mean gain (null with a single draw). ``baseline`` names
    the other model's mean (``scratch_mean``; ``checkpoint_mean`` for the checkpoint before
    this run's pretraining)."""
    gains = [f - s for f, s in zip(finetuned, scratch, strict=True)]
    low, high = mean_interval(gains)
    return {
        "draws": len(gains),
        "finetuned_mean": round(sum(finetuned) / len(gains), 6),
        f"{baseline}_mean": round(sum(scratch) / len(gains), 6),
        "gain_mean": round(sum(gains) / len(gains), 6),
        "gain_min": round(min(gains), 6),
        "gain_ci95_low": low,
        "gain_ci95_high": high,
    }
