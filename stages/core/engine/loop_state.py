"""The training loop's state from epoch to epoch, and the resume snapshot of it: what a
checkpoint holds so that a killed run resumes to the same bytes (weights, optimizer,
schedule, the shuffle and dropout generators, the history and early stopping's best)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from stages.core.engine.distributed import World


@dataclass(frozen=True)
class EpochStats:
    """One epoch's figures, as the loop records, reports and checkpoints them."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch (and a checkpoint carries across a kill)."""

    epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None

    def record(self, stats: EpochStats, state_of: Callable[[], dict], patience: int | None) -> bool:
        """Early stopping's bookkeeping for a finished epoch; True when it says stop.
        ``state_of`` gives the model's state (copied when it is the best so far)."""
        self.epoch = stats.epoch
        if patience is None:
            self.best_epoch = stats.epoch
            return False
        if stats.val_loss < self.best_loss:
            self.best_loss, self.best_epoch = stats.val_loss, stats.epoch
            self.best_state = copy.deepcopy(state_of())
            return False
        return stats.epoch - self.best_epoch >= patience


def rng_state(device: torch.device) -> dict:
    """The CPU's (and the device's, on CUDA) random number generator state."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def take_snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    loop: LoopState,
    world: World,
    device: torch.device,
    sharded: str | None = None,
) -> dict:
    """Everything an uninterrupted run would carry on with after ``loop.epoch``. Every rank
    must call it (the RNG states are gathered); rank 0 saves it. Under fsdp, ``sharded`` names
    the folder that holds the model and optimizer state instead."""
    weights = (
        {"sharded": sharded}
        if sharded is not None
        else {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    )
    return {
        "epoch": loop.epoch,
        **weights,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "shuffle_rng": generator.get_state(),
        "rng": world.gather(rng_state(device)),  # dropout and LoRA dropout draw from these
        "history": [asdict(stats) for stats in loop.history],
        "best_loss": loop.best_loss,
        "best_epoch": loop.best_epoch,
        "best_state": loop.best_state,
    }


def restore(
    state: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    loop: LoopState,
    world: World,
    device: torch.device,
) -> None:
    """Put the loop back where ``state`` (a checkpoint) left it (under fsdp, the model and
    optimizer came back from their shards before)."""
    if "sharded" not in state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["shuffle_rng"])
    rng = state["rng"][world.rank]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    loop.epoch = state["epoch"]
    loop.history = [EpochStats(**stats) for stats in state["history"]]
    loop.best_loss = state["best_loss"]
    loop.best_epoch = state["best_epoch"]
    loop.best_state = state["best_state"]
