"""The one training loop, shared by train, finetune and the baselines (scratch, evaluate's draws).

Batches are index slices of tensors held on the device (measured 1.43x faster than a DataLoader
at these sizes), or, for text, token ids padded per batch (``stages.core.engine.batches``): the
loop asks a batch source for a batch's inputs (a tensor, or a dict the model takes as keyword
arguments) and never knows the architecture. Around that: Adam or AdamW, a learning-rate
schedule (constant, linear or cosine, with warmup),
gradient clipping and accumulation, optional ``torch.compile``, bf16 autocast on CUDA, early
stopping, checkpoints that resume to the same bytes, DistributedDataParallel (or FSDP2's
``fully_shard``, ``parallel: fsdp``) under torchrun and a progress display."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from stages.core.common.errors import TrainingError
from stages.core.common.numbers import rounded
from stages.core.engine.batches import IGNORE_INDEX, BlockBatches, TensorBatches, TokenBatches
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.devices import resolve_device, resolve_precision
from stages.core.engine.distributed import World, agree, current_world
from stages.core.engine.inference import (
    autocast,
    batched_logits,
    call,
    evaluate_loss,
    token_loss_sum,
    token_val_loss,
)
from stages.core.engine.loop_state import EpochStats, LoopState, restore, take_snapshot
from stages.core.engine.optim import build_optimizer, lr_factor
from stages.core.engine.progress import EpochProgress


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    batch_size: int  # rows per optimizer step; several processes split each batch
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = None  # early stopping on val loss; None trains every epoch
    device: str = "auto"
    precision: str = "auto"
    cpu_threads: int | None = None  # None keeps torch's default
    schedule: str = "constant"  # constant | linear | cosine (to 0 at the last step), after warmup
    warmup_epochs: float = 0.0  # linear warmup from lr / warmup steps, in epochs
    grad_clip: float | None = None  # max global gradient norm
    grad_accum: int = 1  # batches whose gradients add up to one optimizer step
    compile: bool = False  # torch.compile the model for training
    # adam: L2 weight decay on every parameter (the feature models' loop); adamw: decoupled
    # decay on the weight matrices only, not on biases and norms (what pretrained models want).
    optimizer: str = "adam"
    eval_batch_size: int | None = None  # token batches' evaluation batch; None = batch_size
    # ddp: every rank holds the whole model (DistributedDataParallel); fsdp: parameters,
    # gradients and optimizer state sharded with FSDP2's fully_shard. One process: no effect.
    parallel: str = "ddp"


def fit_options(section: Mapping[str, Any], **overrides: Any) -> FitOptions:
    """FitOptions from a params section (``train``), skipping its keys that are not options."""
    names = {f.name for f in fields(FitOptions)}
    return FitOptions(**{k: v for k, v in section.items() if k in names} | overrides)


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
    train: tuple[torch.Tensor, torch.Tensor] | Batches,
    val: tuple[torch.Tensor, torch.Tensor] | Batches,
    options: FitOptions,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    param_groups: list[dict] | None = None,
    checkpoints: Checkpoints | None = None,
    progress: str | None = None,
) -> FitResult:
    """Train the model's trainable parameters with Adam (or AdamW) and cross-entropy.

    ``train`` and ``val`` are (features, class indices) tensors or batch sources (``TokenBatches``
    for text, ``BlockBatches`` for language-model pretraining); the model takes a batch's inputs,
    a tensor or a dict of keyword arguments, and returns logits. A source whose targets are per
    token (``token_targets``) is trained and judged on the mean loss over its target tokens.

    ``param_groups`` (Adam's groups, each may set its own ``lr``) replaces the default single
    group of every parameter that requires grad. With ``patience`` set, stops when val loss has
    not improved for that many epochs and restores the best weights. ``checkpoints`` resumes
    from the latest valid checkpoint and saves new ones as it goes. ``progress`` labels the
    progress display (None: quiet). Under torchrun (a process group is up) every rank trains its
    share of each batch under DistributedDataParallel; all ranks end with the same weights.
    With ``options.parallel == "fsdp"`` a sharded copy of the model trains instead (FSDP2's
    ``fully_shard`` per repeated block, then the root; checkpoints through
    ``torch.distributed.checkpoint``) and the full final weights are loaded into ``model`` on
    rank 0 only: the other ranks' ``model`` keeps the weights it came with.
    The model is left on the CPU. ``options.cpu_threads`` holds for this call only: the
    process's thread count is restored when fit returns or raises.
    """
    threads = torch.get_num_threads()
    try:
        return _fit(
            model, train, val, options, on_epoch,
            param_groups=param_groups, checkpoints=checkpoints, progress=progress,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    options: FitOptions,
    on_epoch: Callable[[EpochStats], None] | None,
    *,
    param_groups: list[dict] | None,
    checkpoints: Checkpoints | None,
    progress: str | None,
) -> FitResult:
    """fit's body, which may change the thread count (fit restores it)."""
    world = current_world()
    device = resolve_device(options.device)
    if device.type == "cpu" and options.cpu_threads:
        # Small nets run fastest on one thread: more only adds synchronisation.
        torch.set_num_threads(options.cpu_threads)
    autocast_dtype = resolve_precision(options.precision, device)
    fsdp = _sharding(options, world)
    if fsdp:
        from stages.core.engine.distributed import same_groups, shard

        net = shard(model, device)  # the sharded copy that trains; model gets its final state
        param_groups = same_groups(model, net, param_groups)
    else:
        net = model.to(device)
    train_data, val_data = as_batches(train).to(device), as_batches(val).to(device)
    if len(val_data) == 0:
        raise TrainingError("the val split has no rows: nothing to judge the training by")
    optimizer, trained = build_optimizer(net, param_groups, options)
    steps_per_epoch = math.ceil(len(train_data) / (options.batch_size * options.grad_accum))
    warmup_steps = round(options.warmup_epochs * steps_per_epoch)
    scheduler = None  # a constant lr needs none (and saves its per-step cost)
    if options.schedule != "constant" or warmup_steps > 0:
        factor = lr_factor(options.schedule, warmup_steps, options.epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(options.seed)
    loop = LoopState()
    resumed = checkpoints.latest() if checkpoints is not None else None
    if checkpoints is not None and world.size > 1:
        resumed = world.broadcast(resumed)  # rank 0's: other nodes may not share its disk
    if resumed is not None:
        if fsdp:
            from stages.core.engine.distributed import load_sharded

            load_sharded(net, optimizer, checkpoints.directory / resumed["sharded"])
        restore(resumed, net, optimizer, scheduler, generator, loop, world, device)
    step_model = _for_training(net, options, world, device, fsdp)
    state_of = _full_state_of(net) if fsdp else net.state_dict
    with EpochProgress(progress if world.is_main else None, options.epochs, loop.epoch) as shown:
        for epoch in range(loop.epoch + 1, options.epochs + 1):
            net.train()
            train_sum, counted = _train_epoch(
                step_model, optimizer, scheduler, train_data, generator, options, world,
                autocast_dtype, trained,
            )  # fmt: skip
            val_loss, val_accuracy = _val_loss(net, val_data, options, autocast_dtype)
            total, val_loss, val_accuracy = agree(world, train_sum, val_loss, val_accuracy)
            stats = EpochStats(epoch, total / counted, val_loss, val_accuracy)
            if not loop.history and not math.isfinite(val_loss):
                raise TrainingError(
                    f"val loss is {val_loss} after epoch 1 (train loss {stats.train_loss:.4g}): "
                    f"the training diverged or the data holds non-finite values; "
                    f"try a lower lr (now {options.lr:g})"
                )
            loop.history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
            shown.update(stats)
            stop = loop.record(stats, state_of, options.patience)
            if checkpoints is not None and not stop and checkpoints.due(epoch):
                sharded = None
                if fsdp:  # every rank writes its shard; checkpoint.pt names the folder
                    from stages.core.engine.distributed import save_sharded

                    folder = checkpoints.sharded_folder(epoch)
                    save_sharded(net, optimizer, folder)
                    sharded = folder.name
                snapshot = take_snapshot(
                    net, optimizer, scheduler, generator, loop, world, device, sharded
                )
                checkpoints.save(snapshot)
            if stop:
                break
    if fsdp:  # the full state, gathered on rank 0's CPU, into the plain model there
        final = loop.best_state if loop.best_state is not None else state_of()
        if world.is_main:
            model.load_state_dict(final)
    elif loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    model.to("cpu")
    kept = loop.history[loop.best_epoch - 1]
    if not math.isfinite(kept.val_loss):
        raise TrainingError(
            f"val loss is {kept.val_loss} at epoch {kept.epoch}, the epoch kept: the training "
            f"diverged; try a lower lr (now {options.lr:g}) or grad_clip"
        )
    stopped_early = len(loop.history) < options.epochs
    return FitResult(loop.history, loop.best_epoch, stopped_early, sum(p.numel() for p in trained))


Batches = TensorBatches | TokenBatches | BlockBatches


def _sharding(options: FitOptions, world: World) -> bool:
    """Whether this run trains a sharded copy (fsdp with several processes); fsdp in one
    process is plain training, as ddp is."""
    if options.parallel not in ("ddp", "fsdp"):
        raise TrainingError(f"train.parallel: unknown {options.parallel!r} (ddp or fsdp)")
    if options.parallel == "fsdp" and options.compile and world.size > 1:
        raise TrainingError("train.compile: not supported with train.parallel fsdp yet")
    return options.parallel == "fsdp" and world.size > 1


def _full_state_of(net: nn.Module) -> Callable[[], dict]:
    """fsdp's state for early stopping's best weights: the full state on rank 0 (empty on
    the others); a collective, which every rank reaches on the same epochs."""
    from stages.core.engine.distributed import full_state

    return lambda: full_state(net)


def as_batches(data: tuple[torch.Tensor, torch.Tensor] | Batches) -> Batches:
    """A batch source as it is; (features, class indices) tensors as ``TensorBatches``."""
    sources = (TensorBatches, TokenBatches, BlockBatches)
    return data if isinstance(data, sources) else TensorBatches(*data)


def token_targets(data: Batches) -> bool:
    """True when the source's targets are per token (``labelled`` gives a step's inputs and
    targets, ``IGNORE_INDEX`` where none): the loss is then the mean over target tokens."""
    return getattr(data, "token_targets", False)


def _for_training(
    model: nn.Module, options: FitOptions, world: World, device: torch.device, fsdp: bool
) -> nn.Module:
    """The module the training steps call: compiled and/or DDP-wrapped as asked (nanoGPT's
    order); it shares its parameters with ``model``. Under fsdp, ``model`` is already sharded."""
    if fsdp:
        return model
    step_model = torch.compile(model) if options.compile else model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=device_ids)
    return step_model


def _train_epoch(
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    data: Batches,
    generator: torch.Generator,
    options: FitOptions,
    world: World,
    autocast_dtype: torch.dtype | None,
    trained: list[nn.Parameter],
) -> tuple[torch.Tensor, int]:
    """One pass over the shuffled rows; returns this rank's sum of per-row train losses and
    what it averages over: the rows (of every rank), or for per-token targets the target
    tokens of every rank (see ``_train_token_epoch``).

    Every rank draws the same permutation. An optimizer step takes ``batch_size x grad_accum``
    rows as ``grad_accum`` batches; under DDP each rank takes every ``size``-th row of each batch.
    Each piece's loss is scaled so that the step's gradient is the mean over all of its rows, as
    one big batch on one process would give. FSDP's reduce-scatter averages over the ranks as
    DDP's all-reduce does, so the same scaling holds; its ``set_requires_gradient_sync`` is
    DDP's ``no_sync``.
    """
    if token_targets(data):
        return _train_token_epoch(
            step_model, optimizer, scheduler, data, generator, options, world, autocast_dtype,
            trained,
        )  # fmt: skip
    y = data.targets
    device = y.device
    order = data.order(generator, options.batch_size).to(device)
    total = torch.zeros((), device=device)
    step_rows = options.batch_size * options.grad_accum
    plain = world.size == 1 and options.grad_accum == 1
    for start in range(0, len(data), step_rows):
        step = order[start : start + step_rows]
        optimizer.zero_grad(set_to_none=True)
        batches = step.split(options.batch_size)
        for i, idx in enumerate(batches):
            if world.size > 1:
                idx = idx[world.rank :: world.size]
            with _gradient_sync(step_model, world.size == 1 or i == len(batches) - 1):
                with autocast(device, autocast_dtype):
                    logits = call(step_model, data.inputs(idx))
                    if plain:  # the common case, kept exactly as the bare loop computes it
                        loss = nn.functional.cross_entropy(logits, y[idx])
                        total += loss.detach() * len(idx)
                    else:
                        loss_sum = nn.functional.cross_entropy(
                            logits.float(), y[idx], reduction="sum"
                        )
                        total += loss_sum.detach()
                        loss = loss_sum * (world.size / len(step))  # DDP divides by size
                loss.backward()
        _optimizer_step(optimizer, scheduler, trained, options)
    return total, len(data)


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    trained: list[nn.Parameter],
    options: FitOptions,
) -> None:
    """The end of a step: clip the gradients' global norm (if asked), step, advance the lr."""
    if options.grad_clip is not None:
        nn.utils.clip_grad_norm_(trained, options.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _gradient_sync(step_model: nn.Module, syncing: bool):
    """The context of one batch's backward: under DDP, gradients are averaged across ranks once
    per step, on its last batch (``no_sync`` before it); FSDP's ``set_requires_gradient_sync``
    is DDP's ``no_sync``; one process needs neither."""
    if hasattr(step_model, "set_requires_gradient_sync"):  # an FSDPModule
        step_model.set_requires_gradient_sync(syncing)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if syncing else step_model.no_sync()


def _train_token_epoch(
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    data: BlockBatches,
    generator: torch.Generator,
    options: FitOptions,
    world: World,
    autocast_dtype: torch.dtype | None,
    trained: list[nn.Parameter],
) -> tuple[torch.Tensor, int]:
    """``_train_epoch`` for per-token targets. Each step's targets (an MLM's masks) are drawn
    for the whole step from the loop's generator, identically on every rank, so every rank
    knows the step's target-token count without a collective: each piece's summed loss is
    divided by it (times the ranks, which DDP divides by), and the step's gradient is the mean
    over its target tokens, as on one process."""
    device = data.targets.device
    order = data.order(generator, options.batch_size).to(device)
    total = torch.zeros((), device=device)
    counted = 0
    step_rows = options.batch_size * options.grad_accum
    for start in range(0, len(data), step_rows):
        step = order[start : start + step_rows]
        inputs, targets = data.labelled(step, generator)
        n_targets = int((targets != IGNORE_INDEX).sum())
        counted += n_targets
        optimizer.zero_grad(set_to_none=True)
        pieces = torch.arange(len(step), device=device).split(options.batch_size)
        for i, rows in enumerate(pieces):
            if world.size > 1:
                rows = rows[world.rank :: world.size]
            with _gradient_sync(step_model, world.size == 1 or i == len(pieces) - 1):
                with autocast(device, autocast_dtype):
                    logits = call(step_model, {k: v[rows] for k, v in inputs.items()})
                    loss_sum = token_loss_sum(logits, targets[rows])
                total += loss_sum.detach()
                loss = loss_sum * (world.size / max(n_targets, 1))
                loss.backward()
        _optimizer_step(optimizer, scheduler, trained, options)
    return total, max(counted, 1)


def _val_loss(
    model: nn.Module, data: Batches, options: FitOptions, autocast_dtype: torch.dtype | None
) -> tuple[float, float]:
    if isinstance(data, TensorBatches):  # one batch of every row, as the loop always did
        return evaluate_loss(model, data.x, data.y, autocast_dtype)
    if token_targets(data):
        return token_val_loss(model, data, options.eval_batch_size or options.batch_size,
                              autocast_dtype)  # fmt: skip
    logits = batched_logits(
        model, data, options.eval_batch_size or options.batch_size, autocast_dtype
    )
    loss = nn.functional.cross_entropy(logits.float(), data.y)
    return float(loss), float((logits.argmax(dim=1) == data.y).float().mean())


def history_rows(result: FitResult) -> list[dict]:
    """One dict per epoch (epoch, train_loss, val_loss, val_accuracy), rounded for stable files."""
    return [{k: rounded(v) for k, v in asdict(stats).items()} for stats in result.history]


def fit_summary(result: FitResult) -> dict:
    """The metrics a training stage reports: the kept epoch's losses and accuracy."""
    best = result.best
    return {
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_loss": rounded(best.train_loss),
        "val_loss": rounded(best.val_loss),
        "val_accuracy": rounded(best.val_accuracy),
    }
