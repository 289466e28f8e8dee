"""Evaluation of text models (``model.arch: hf``): each model scored on raw test texts, the two
baselines on the same rows (the same architecture from random weights over the draws, and
TF-IDF with logistic regression), and the most confident mistakes for the report.

The figures themselves are the ones the feature models get (``metrics``, ``results``): only
how predictions are made differs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from stages.core.common.params import Params
from stages.core.common.schema import LABEL, TEXT
from stages.core.evaluation.baselines import Draw
from stages.core.evaluation.scoring import Scored
from stages.core.modeling import text
from stages.core.modeling.finetuning import finetune_text, sample_shots

MISTAKES_SHOWN = 5
MISTAKE_CHARS = 80  # a mistake's text in the report, shortened to this


def score_text_model(
    model: text.TextClassifier, tokenizer: Any, config: text.TextModelConfig, frame: pd.DataFrame
) -> Scored:
    """Predicted labels and class probabilities of a text model on ``frame``'s texts."""
    proba = text.predict_texts(model, tokenizer, frame[TEXT].tolist(), config.max_length).numpy()
    predicted = np.asarray(config.classes, dtype=object)[proba.argmax(axis=1)]
    pairs = pd.DataFrame({"actual": frame[LABEL].to_numpy(), "predicted": predicted.tolist()})
    return Scored(pairs=pairs, proba=proba, classes=list(config.classes))


def tfidf_baseline(shots: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Predictions on ``test`` of TF-IDF (words and word pairs) with a logistic regression,
    fitted on the same rows the model was fine-tuned on."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    classifier = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000)
    )
    classifier.fit(shots[TEXT].tolist(), shots[LABEL].to_numpy())
    predicted = classifier.predict(test[TEXT].tolist())
    return pd.DataFrame({"actual": test[LABEL].to_numpy(), "predicted": predicted})


def compare_text_draws(
    base: tuple[text.TextClassifier, Any, text.TextModelConfig],
    shipped: Scored,
    target: dict[str, pd.DataFrame],
    params: Params,
) -> list[Draw]:
    """Fine-tuning the base model vs the same architecture from random weights and vs TF-IDF
    with a logistic regression, on the same rows, for ``evaluate.draws`` draws (seed
    ``finetune.seed + i``; draw 0 is the shipped model, scored rather than retrained). With
    ``finetune.shots_per_class: null`` every draw trains on every row, and the draws differ in
    their seeds only (head, order, dropout; TF-IDF is then the same on every draw)."""
    model, tokenizer, config = base
    test = target["test"]
    draws = []
    for i in range(params.evaluate.draws):
        seed = params.finetune.seed + i
        shots = sample_shots(target["train"], params.finetune.shots_per_class, seed)
        if i == 0:
            tuned = shipped.pairs
        else:
            run = finetune_text(model, tokenizer, config, shots, target["val"], params, seed)
            tuned = score_text_model(run.model, tokenizer, run.config, test).pairs
        scratch = finetune_text(
            model, tokenizer, config, shots, target["val"], params, seed, keep_body=False
        )
        scratch_pairs = score_text_model(scratch.model, tokenizer, scratch.config, test).pairs
        draws.append(
            Draw(seed, finetuned=tuned, scratch=scratch_pairs, sklearn=tfidf_baseline(shots, test))
        )
    return draws


def checkpoint_draws(
    config: text.TextModelConfig, target: dict[str, pd.DataFrame], params: Params
) -> list[pd.DataFrame]:
    """Domain-adaptive pretraining's control: ``model.pretrained`` as it was downloaded, before
    this run's pretraining (``train.objective`` mlm or clm), fine-tuned with the same strategy
    on the same shots and seeds as each of ``compare_text_draws``' draws; its test
    predictions, one frame a draw."""
    checkpoint = text.load_pretrained(params.model, config.classes, config.text_column)
    draws = []
    for i in range(params.evaluate.draws):
        seed = params.finetune.seed + i
        shots = sample_shots(target["train"], params.finetune.shots_per_class, seed)
        run = finetune_text(*checkpoint, shots, target["val"], params, seed)
        draws.append(score_text_model(run.model, checkpoint[1], run.config, target["test"]).pairs)
    return draws


def confident_mistakes(scored: Scored, texts: list[str], shown: int = MISTAKES_SHOWN) -> list[dict]:
    """The ``shown`` wrong predictions the model was surest of: text (shortened), true label,
    predicted label and the predicted label's probability, most confident first."""
    confidence = scored.proba.max(axis=1)
    wrong = np.flatnonzero(
        scored.pairs["actual"].to_numpy() != scored.pairs["predicted"].to_numpy()
    )
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:shown]
    rows = []
    for i in order:
        snippet = " ".join(str(texts[i]).split())
        if len(snippet) > MISTAKE_CHARS:
            snippet = snippet[: MISTAKE_CHARS - 1] + "…"
        rows.append(
            {
                "text": snippet,
                "actual": scored.pairs["actual"].iloc[i],
                "predicted": scored.pairs["predicted"].iloc[i],
                "confidence": round(float(confidence[i]), 4),
            }
        )
    return rows
