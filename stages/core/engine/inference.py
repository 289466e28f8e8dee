"""What a trained model computes, outside the training loop: its logits for one batch, for a
whole token set in batches, the validation loss (masked or next-token too), and class
probabilities and predictions. The loop (stages/core/engine/training.py) uses the same
functions for its validation, so a model is scored the same way in both."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from stages.core.engine.batches import IGNORE_INDEX, BlockBatches, TokenBatches


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the target tokens of a batch (logits: rows x positions x
    classes), in float32."""
    return nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def call(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for one batch's inputs: a tensor, or a dict of keyword arguments."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@torch.no_grad()
def batched_logits(
    model: nn.Module,
    data: TokenBatches,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits of every row of ``data`` in eval mode, in its row order, computed in batches of
    similar lengths (on ``data``'s device)."""
    model.eval()
    order = data.eval_order().to(data.ids.device)
    pieces = []
    for idx in order.split(batch_size):
        with autocast(data.ids.device, autocast_dtype):
            pieces.append(call(model, data.inputs(idx)).float())
    logits = torch.cat(pieces)
    return logits[torch.argsort(order)]


# The validation masks of an MLM: drawn from this seed at every evaluation, so that every
# epoch is judged on the same masked tokens.
VAL_MASK_SEED = 0


@torch.no_grad()
def token_val_loss(
    model: nn.Module, data: BlockBatches, batch_size: int, autocast_dtype: torch.dtype | None
) -> tuple[float, float]:
    """Mean cross-entropy over the target tokens of ``data`` (every block, in eval mode) and
    the share of them the model predicts (masked-token or next-token accuracy)."""
    model.eval()
    generator = torch.Generator().manual_seed(VAL_MASK_SEED)
    loss = torch.zeros((), dtype=torch.float64)
    hits, counted = 0, 0
    for idx in data.eval_order().to(data.ids.device).split(batch_size):
        inputs, targets = data.labelled(idx, generator)
        with autocast(data.ids.device, autocast_dtype):
            logits = call(model, inputs)
        loss += token_loss_sum(logits, targets).double().cpu()
        kept = targets != IGNORE_INDEX
        hits += int((logits.argmax(-1)[kept] == targets[kept]).sum())
        counted += int(kept.sum())
    if counted == 0:
        return math.nan, math.nan
    return float(loss / counted), hits / counted


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when a dtype is chosen (CUDA); a no-op context in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode."""
    model.eval()
    if len(x) == 0:
        return math.nan, math.nan
    with autocast(x.device, autocast_dtype):
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    accuracy = (logits.argmax(dim=1) == y).float().mean()
    return float(loss), float(accuracy)


@torch.no_grad()
def predict_proba(
    model: nn.Module, x: torch.Tensor | TokenBatches, batch_size: int = 256
) -> torch.Tensor:
    """Class probabilities for ``x``: the softmax of ``model``'s logits, on the CPU.

    One row per input, one column per class index. The softmax runs in float64 so that each
    row sums to 1 as closely as scikit-learn's probability metrics expect. Token batches run
    in batches of ``batch_size`` texts.
    """
    model.eval()
    if isinstance(x, TokenBatches):
        return torch.softmax(batched_logits(model, x, batch_size).double().cpu(), dim=1)
    return torch.softmax(model(x).double(), dim=1)


def predict(model: nn.Module, x: torch.Tensor | TokenBatches) -> torch.Tensor:
    """Class indices predicted by ``model`` for ``x``: the most probable class of each row."""
    return predict_proba(model, x).argmax(dim=1)
