"""The text path of the train and finetune stages (``model.arch: hf``): a pretrained checkpoint
fine-tuned on the base domain's labels (or taken as it is), and the base model adapted to the
target's labelled rows with the head, full or lora strategy.

The recipes the evaluate stage repeats for its draws live here too, so that every draw trains
exactly as the shipped model did: ``finetune_text`` with ``keep_body=False`` is the same
architecture from random weights (the scratch baseline)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from stages.core.common.params import Params
from stages.core.common.schema import LABEL, TEXT
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.training import EpochStats, FitResult, fit
from stages.core.modeling import text
from stages.core.modeling.finetuning import few_shot_options
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


def finetune_text(
    base: text.TextClassifier,
    tokenizer: Any,
    base_config: text.TextModelConfig,
    shots: pd.DataFrame,
    val: pd.DataFrame,
    params: Params,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    keep_body: bool = True,
    checkpoints: Checkpoints | None = None,
    progress: str | None = None,
) -> TextRun:
    """A new, seeded head over the shots' classes on the base model's body, trained on
    ``shots`` with ``finetune.strategy`` and the few-shot options (AdamW). ``keep_body=False``
    is the scratch baseline: the same architecture from random weights, every layer trained.

    A LoRA model comes back unmerged (a peft model): ``text.save_text_model`` merges it, so
    predict with it before saving where the unmerged model matters."""
    classes = sorted(shots[LABEL].unique().tolist())
    model, config = text.with_new_head(base, base_config, classes, seed, keep_body=keep_body)
    strategy = params.finetune.strategy if keep_body else "full"
    torch.manual_seed(seed)  # LoRA's A matrices draw from the global generator
    model = text.adapt(model, config, strategy, params.finetune.lora)
    t, v = tokenize_rows(tokenizer, shots, config), tokenize_rows(tokenizer, val, config)
    options = replace(few_shot_options(params, seed), optimizer="adamw")
    kwargs = {"checkpoints": checkpoints, "progress": progress}
    result = None
    if strategy == "head":
        result = text.fit_head_on_embeddings(
            model, config, t.batches, v.batches, options, on_epoch, **kwargs
        )
    if result is None:
        body_lr = params.finetune.body_lr if keep_body else None
        groups = text.optimizer_groups(model, config, body_lr)
        result = fit(model, t.batches, v.batches, options, on_epoch, param_groups=groups, **kwargs)
    trainable = text.trainable_parameters(model)
    domain = params.data.domains()[-1] if keep_body else "shots only"
    config = config.replace(trained_on={"domain": domain, "rows": len(shots)})
    return TextRun(model, tokenizer, config, result, t.truncated + v.truncated, trainable)
