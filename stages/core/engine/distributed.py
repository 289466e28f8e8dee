"""Several processes: relaunching a stage through PyTorch's launcher (torchrun), the process
group of each worker, and the few collectives the training loop needs.

``train.nproc`` processes per node on ``train.nnodes`` nodes: when that is more than one and
the stage is not already a torchrun worker, it runs itself again as
``python -m torch.distributed.run ... -m stages.train``. Each worker joins a process group
(NCCL on CUDA, gloo on the CPU), trains its shard of every batch under DistributedDataParallel,
and only rank 0 writes outputs and logs to MLflow. With ``train.parallel: fsdp`` the loop
shards the model instead with PyTorch's ``fully_shard`` (per repeated block, then the root) and
checkpoints the sharded state through ``torch.distributed.checkpoint``."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.common.errors import TrainingError, one_line
from stages.core.common.params import TrainParams
from stages.core.engine.devices import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs, checkpoints and logs."""
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (a list of one without a process group)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_world() -> World:
    """The process group's view of this process, or a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_worker() -> bool:
    """True inside a process that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def needs_launch(train: TrainParams) -> bool:
    """More than one process asked for, and this is not yet one of them."""
    return train.nproc * train.nnodes > 1 and not is_worker()


def launch_command(module: str, train: TrainParams) -> list[str]:
    """The torchrun command line that runs ``python -m <module>`` as every worker."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.nproc}"]
    if train.nnodes == 1:
        command.append("--standalone")  # a rendezvous on a free local port
    else:
        command += [
            f"--nnodes={train.nnodes}",
            f"--node-rank={train.node_rank}",
            f"--rdzv-endpoint={train.rdzv_endpoint}",
        ]
    return [*command, "-m", module]


def check_devices(train: TrainParams) -> torch.device:
    """The device the params ask for, checked before anything starts: one clear line when
    CUDA is asked for but absent, or when there are fewer GPUs than processes per node."""
    device = resolve_device(train.device)
    if device.type == "cuda" and train.nproc > torch.cuda.device_count():
        raise TrainingError(
            f"train.nproc: {train.nproc} processes per node but this node has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def relaunch(module: str, train: TrainParams, label: str) -> None:
    """Run the stage again as torchrun's workers (torchrun's own code, in this process) and
    wait for them. A failed worker or rendezvous is one TrainingError line; the workers' own
    messages come before it."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    command = launch_command(module, train)
    print(f"{label}: {train.nproc} process(es) x {train.nnodes} node(s) through torchrun")
    sys.stdout.flush()
    # torchrun's own multi-line failure report would repeat what the one line below says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(train.cpu_threads or 1))
    try:
        run(parse_args(command[3:]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise TrainingError(
            f"the torchrun worker of rank {rank} failed (exit code {failure.exitcode}) and the "
            "others were stopped; its messages are above"
        ) from None
    except RendezvousError as exc:
        where = train.rdzv_endpoint or "localhost"
        raise TrainingError(
            f"train.rdzv_endpoint: rendezvous at {where} failed: {one_line(exc, 200)}"
        ) from None


@contextmanager
def process_group(requested_device: str) -> Iterator[World]:
    """Join the process group when torchrun started this process (NCCL on CUDA, gloo on the
    CPU) and leave it at the end; without torchrun, a world of one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield World()
        return
    import torch.distributed as dist

    device = resolve_device(requested_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield current_world()
    finally:
        dist.destroy_process_group()


def agree(
    world: World, train_sum: torch.Tensor, val_loss: float, val_accuracy: float
) -> tuple[float, float, float]:
    """The epoch's figures every rank acts on: the train-loss sum over all ranks, and rank 0's
    val loss and accuracy (so that early stopping decides the same everywhere)."""
    if world.size == 1:
        return float(train_sum), val_loss, val_accuracy
    import torch.distributed as dist

    mine = [float(train_sum), val_loss, val_accuracy] if world.is_main else [float(train_sum), 0, 0]
    values = torch.tensor(mine, dtype=torch.float64, device=train_sum.device)
    dist.all_reduce(values)
    total, loss, accuracy = values.tolist()
    return total, loss, accuracy


# --- FSDP (train.parallel: fsdp): PyTorch's own fully_shard (FSDP2) and distributed checkpoint --


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` sharded across the process group with PyTorch's
    ``fully_shard`` (FSDP2): each repeated block (every child of an ``nn.ModuleList`` that is
    not inside another such block) is its own FSDP unit, then the root takes what is left.
    ``model`` itself stays as it is (a plain module on its device)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The mesh of this run's device type (the default would take CUDA whenever one is seen,
    # also for a gloo run on the CPU).
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    sharded = copy.deepcopy(model).to(device)
    for block in repeated_blocks(sharded):
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of ``model``'s ``nn.ModuleList``s that hold parameters, outermost only (a
    ModuleList inside a block belongs to that block), in ``named_modules`` order."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # ids of modules within a chosen block

    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for child in module:
            if any(True for _ in child.parameters()):
                blocks.append(child)
                inside.update(id(m) for m in child.modules())
    return blocks


def same_groups(
    model: nn.Module, sharded: nn.Module, param_groups: list[dict] | None
) -> list[dict] | None:
    """``param_groups`` over ``model``'s parameters, rewritten over ``sharded``'s (matched by
    name: fully_shard replaces every parameter by a sharded one of the same name)."""
    if param_groups is None:
        return None
    names = {id(p): name for name, p in model.named_parameters()}
    by_name = dict(sharded.named_parameters())
    return [
        {**group, "params": [by_name[names[id(p)]] for p in group["params"]]}
        for group in param_groups
    ]


def full_state(sharded: nn.Module) -> dict:
    """The unsharded model state on rank 0's CPU (an empty dict on the other ranks), with
    torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``; every rank must
    call it. Buffers (FSDP does not shard them) are rank 0's own tensors, not copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(sharded, options=options)


def save_sharded(sharded: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shard of the model and optimizer state into ``folder`` through
    ``torch.distributed.checkpoint`` (rank 0 adds the metadata); every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(sharded, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(sharded: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Put the model and optimizer state that ``save_sharded`` wrote back, each rank reading
    its own shard; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(sharded, optimizer)  # templates to fill
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        sharded,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
