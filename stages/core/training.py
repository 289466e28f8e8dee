"""The one training loop, shared by train, finetune and the scratch baseline."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from stages.core.model import resolve_device, resolve_precision


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = None  # early stopping on val loss; None trains every epoch
    device: str = "auto"
    precision: str = "auto"
    cpu_threads: int | None = None  # None keeps torch's default


def fit_options(section: Mapping[str, Any], **overrides: Any) -> FitOptions:
    """FitOptions from a params section (``train``), skipping its keys that are not options."""
    names = {f.name for f in fields(FitOptions)}
    return FitOptions(**{k: v for k, v in section.items() if k in names} | overrides)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float


@dataclass
class FitResult:
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    trainable_parameters: int = 0

    @property
    def best(self) -> EpochStats:
        return self.history[self.best_epoch - 1]


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    options: FitOptions,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    param_groups: list[dict] | None = None,
) -> FitResult:
    """Train the model's trainable parameters with Adam and cross-entropy.

    ``param_groups`` (Adam's groups, each may set its own ``lr``) replaces the default single
    group of every parameter that requires grad. With ``patience`` set, stops when val loss has
    not improved for that many epochs and restores the best weights. The model is left on the
    CPU.
    """
    device = resolve_device(options.device)
    if device.type == "cpu" and options.cpu_threads:
        # Small nets run fastest on one thread: more only adds synchronisation.
        torch.set_num_threads(options.cpu_threads)
    autocast_dtype = resolve_precision(options.precision, device)
    model.to(device)
    x_train, y_train = (t.to(device) for t in train)
    x_val, y_val = (t.to(device) for t in val)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    trainable = sum(p.numel() for group in groups for p in group["params"])
    optimizer = torch.optim.Adam(groups, lr=options.lr, weight_decay=options.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(options.seed)
    history: list[EpochStats] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    n = len(x_train)
    for epoch in range(1, options.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, options.batch_size):
            idx = order[start : start + options.batch_size]
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        val_loss, val_accuracy = evaluate_loss(model, x_val, y_val, autocast_dtype)
        stats = EpochStats(epoch, float(total) / n, val_loss, val_accuracy)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if options.patience is None:
            best_epoch = epoch
            continue
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= options.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu")
    stopped_early = len(history) < options.epochs
    return FitResult(history, best_epoch, stopped_early, trainable)


def _autocast(device: torch.device, dtype: torch.dtype | None):
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
    with _autocast(x.device, autocast_dtype):
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    accuracy = (logits.argmax(dim=1) == y).float().mean()
    return float(loss), float(accuracy)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class indices predicted by ``model`` for ``x`` (on the CPU, fp32)."""
    model.eval()
    return model(x).argmax(dim=1)


def history_rows(result: FitResult) -> list[dict]:
    """One dict per epoch (epoch, train_loss, val_loss, val_accuracy), rounded for stable files."""
    return [{k: _round(v) for k, v in asdict(stats).items()} for stats in result.history]


def fit_summary(result: FitResult) -> dict:
    """The metrics a training stage reports: the kept epoch's losses and accuracy."""
    best = result.best
    return {
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_loss": _round(best.train_loss),
        "val_loss": _round(best.val_loss),
        "val_accuracy": _round(best.val_accuracy),
    }


def _round(value: float) -> float:
    return value if isinstance(value, int) else round(float(value), 6)
