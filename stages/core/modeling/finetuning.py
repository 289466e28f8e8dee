"""Fine-tuning: few-shot sampling and adapting a base model to the target domain, for the
classifier of numeric features (``fine_tune``) and for a Hugging Face text model
(``finetune_text``, ``model.arch: hf``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from stages.core.common.errors import DataError
from stages.core.common.numbers import plain
from stages.core.common.params import LoraParams, Params
from stages.core.common.schema import LABEL
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.training import FitOptions, FitResult, fit, fit_options
from stages.core.modeling import text, text_head
from stages.core.modeling.lora import add_lora, merge_lora, resolve_targets
from stages.core.modeling.model import Classifier, ModelConfig, encode
from stages.core.modeling.text_training import TextRun, tokenize_rows


def sample_shots(frame: pd.DataFrame, shots_per_class: int | None, seed: int) -> pd.DataFrame:
    """``shots_per_class`` labelled rows of every class, drawn without replacement, seeded;
    None: every row of ``frame``, as it is."""
    if shots_per_class is None:
        return frame.reset_index(drop=True)
    counts = frame[LABEL].value_counts()
    short = counts[counts < shots_per_class]
    if not short.empty:
        raise DataError(
            f"finetune.shots_per_class: class {plain(short.index[0])!r} has only "
            f"{short.iloc[0]} rows in the target train split (< {shots_per_class})"
        )
    shots = frame.groupby(LABEL, group_keys=False, sort=True).sample(
        n=shots_per_class, random_state=seed
    )
    return shots.reset_index(drop=True)


def adapt(
    base: Classifier,
    n_classes: int,
    strategy: str,
    seed: int,
    lora: LoraParams | None = None,
    arch: str = "mlp",
) -> nn.Module:
    """A copy of ``base`` with a fresh, seeded head over ``n_classes``, ready to train.

    ``head`` freezes the body so that only the new head learns; ``full`` trains every layer;
    ``lora`` freezes the body's weights and adds peft LoRA adapters to its ``lora`` target
    layers (the ``arch``'s default when none are named); the head trains fully. A LoRA model
    is a peft model until ``merge_lora`` merges it.
    """
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.head = nn.Linear(model.head.in_features, n_classes)
    model.body.requires_grad_(strategy == "full")
    if strategy != "lora":
        return model
    lora = lora or LoraParams()
    targets = resolve_targets(model.body, arch, lora.target_modules)
    return add_lora(model, targets, lora.rank, lora.alpha, lora.dropout)


def optimizer_groups(model: nn.Module, body_lr: float | None) -> list[dict] | None:
    """Adam groups with ``body_lr`` for the pretrained body (strategy full); None = one group."""
    if body_lr is None:
        return None
    body = [p for p in model.body.parameters() if p.requires_grad]
    rest = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith("body.")
    ]
    return [{"params": body, "lr": body_lr}, {"params": rest}]


def few_shot_options(params: Params, seed: int | None = None) -> FitOptions:
    """Training options for the few-shot runs (fine-tune and the scratch baseline): fixed
    epochs, no early stopping, since selecting on the val split would use more labels.

    Every option ``finetune`` sets comes from there; the rest (device, precision, threads,
    compile, and any option added later) from ``train``, so no option can be left out."""
    sections = params.section("train") | params.section("finetune")
    overrides = {"patience": None} | ({} if seed is None else {"seed": seed})
    return fit_options(sections, **overrides)


def fine_tune(
    base: Classifier,
    base_config: ModelConfig,
    shots: pd.DataFrame,
    val: pd.DataFrame,
    params: Params,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    checkpoints: Checkpoints | None = None,
    progress: str | None = None,
) -> tuple[Classifier, ModelConfig, FitResult]:
    """The fine-tune recipe: a new head over the shots' classes, ``finetune.strategy``,
    trained on ``shots`` with the few-shot options and ``seed``. The model comes back as a
    plain Classifier (LoRA merged); ``result.trainable_parameters`` counts what trained."""
    classes = sorted(shots[LABEL].unique().tolist())
    config = base_config.replace(
        classes=classes, trained_on={"domain": params.data.target_domain, "rows": len(shots)}
    )
    tune = params.finetune
    model = adapt(base, len(classes), tune.strategy, seed, tune.lora, base_config.arch)
    options = few_shot_options(params, seed)
    groups = optimizer_groups(model, tune.body_lr)
    result = fit(
        model,
        encode(shots, config),
        encode(val, config),
        options,
        on_epoch,
        param_groups=groups,
        checkpoints=checkpoints,
        progress=progress,
    )
    return merge_lora(model), config, result


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
    is the scratch baseline: the same architecture from random weights, every layer trained
    (``evaluate.scratch_strategy: full``) or ``finetune.strategy`` (``same``). The head reads
    the body with ``finetune.pooling``.

    A LoRA model comes back unmerged (a peft model): ``text.save_text_model`` merges it, so
    predict with it before saving where the unmerged model matters."""
    classes = sorted(shots[LABEL].unique().tolist())
    tune = params.finetune
    model, config = text.with_new_head(
        base, base_config, classes, seed, keep_body=keep_body, pooling=tune.pooling
    )
    same = keep_body or params.evaluate.scratch_strategy == "same"
    strategy = tune.strategy if same else "full"
    torch.manual_seed(seed)  # LoRA's A matrices draw from the global generator
    model = text.adapt(model, config, strategy, params.finetune.lora)
    t, v = tokenize_rows(tokenizer, shots, config), tokenize_rows(tokenizer, val, config)
    options = replace(few_shot_options(params, seed), optimizer="adamw")
    kwargs = {"checkpoints": checkpoints, "progress": progress}
    result = None
    if strategy == "head":
        result = text_head.fit_head_on_embeddings(
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
