"""The optimizer and learning-rate schedule fit trains with: Adam or AdamW (matrices decayed,
vectors not), fused on CUDA, and a warmup then constant, linear or cosine multiplier."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from stages.core.common.errors import TrainingError

if TYPE_CHECKING:
    from stages.core.engine.training import FitOptions


def build_optimizer(
    model: nn.Module, param_groups: list[dict] | None, options: FitOptions
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """The optimizer over ``param_groups`` (or every parameter that requires grad) and the
    parameters it trains. AdamW without groups decays the matrices only (nanoGPT's rule:
    biases, norms' scales and other vectors keep their values)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "adamw":
        groups = param_groups or [
            {"params": [p for p in trainable if p.dim() >= 2]},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [group for group in groups if group["params"]]
        # One fused kernel per step on CUDA (the pretraining benchmark's MFU needs it); plain
        # tensors only: FSDP's sharded parameters take the default implementation.
        fused = bool(trainable) and all(
            p.is_cuda and not hasattr(p, "device_mesh") for p in trainable
        )
        fused = fused or None
        optimizer = torch.optim.AdamW(
            groups, lr=options.lr, weight_decay=options.weight_decay, fused=fused
        )
    elif options.optimizer == "adam":
        groups = param_groups or [{"params": trainable}]
        optimizer = torch.optim.Adam(groups, lr=options.lr, weight_decay=options.weight_decay)
    else:
        raise TrainingError(f"unknown optimizer {options.optimizer!r} (adam or adamw)")
    return optimizer, [p for group in groups for p in group["params"]]


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base lr at each optimizer step (0-based): a linear warmup over
    ``warmup_steps``, then 1 (``constant``), or from 1 down to 0 at ``total_steps`` in a line
    (``linear``) or a cosine (``cosine``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor
