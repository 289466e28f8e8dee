"""The text path of the train and finetune stages (``model.arch: hf``): a pretrained checkpoint
fine-tuned on the base domain's labels (or taken as it is). The finetune stage's recipe,
``finetune_text``, is in stages.core.modeling.finetuning beside the digits one, so that an edit
to either reruns finetune and evaluate but not train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from stages.core.common.params import Params
from stages.core.common.schema import LABEL, TEXT
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.training import FitResult, fit
from stages.core.modeling import text
from stages.core.modeling.tokenization import Tokenized, label_indices, tokenize


@dataclass
class TextRun:
    """A trained (or taken) text model: the model, its tokenizer and config, what ``fit()``
    reported (None: nothing trained, ``train.objective: none``), the rows ``max_length`` cut
    short, and the parameters that trained."""

    model: text.TextClassifier
    tokenizer: Any
    config: text.TextModelConfig
    result: FitResult | None
    truncated: int
    trainable_parameters: int


def tokenize_rows(tokenizer: Any, frame: pd.DataFrame, config: text.TextModelConfig) -> Tokenized:
    """Token batches of a split's texts, with the class index of each row's label."""
    y = label_indices(frame[LABEL].tolist(), config.classes)
    return tokenize(tokenizer, frame[TEXT].tolist(), config.max_length, y)


def train_text(
    params: Params,
    train: pd.DataFrame,
    val: pd.DataFrame,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    checkpoints: Checkpoints | None = None,
    progress: str | None = None,
) -> TextRun:
    """The base model of ``model.pretrained``: with ``train.objective: classify`` fine-tuned on
    ``train`` (the base domain's train split, validated on ``val``) with the train options and
    AdamW; with ``none`` the checkpoint as it is, with a fresh head over the base's classes."""
    torch.manual_seed(params.train.seed)  # the fresh head draws from the global generator
    classes = sorted(train[LABEL].unique().tolist())
    model, tokenizer, config = text.load_pretrained(params.model, classes, params.data.text_column)
    if params.train.objective == "none":
        return TextRun(model, tokenizer, config, None, 0, 0)
    t, v = tokenize_rows(tokenizer, train, config), tokenize_rows(tokenizer, val, config)
    result = fit(
        model,
        t.batches,
        v.batches,
        text.text_fit_options(params.section("train")),
        on_epoch,
        checkpoints=checkpoints,
        progress=progress,
    )
    config = config.replace(trained_on={"domain": params.data.base_domain, "rows": len(train)})
    return TextRun(
        model, tokenizer, config, result, t.truncated + v.truncated, result.trainable_parameters
    )
