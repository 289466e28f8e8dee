"""fit() under DistributedDataParallel: two real gloo processes on this CPU (no mocks)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_blobs, make_config, make_model, spawn_ranks, state_copy

from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.training import FitOptions, fit

OPTIONS = FitOptions(epochs=6, batch_size=16, lr=0.02, seed=3, device="cpu", cpu_threads=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Killed(Exception):
    pass


def _train(
    rank: int, out: Path, kill_at: int | None, tag: str, dropout: float, folder: str
) -> None:
    """One DDP rank's run: train the blobs model; each rank has its own checkpoint folder
    (under ``out / folder``), as nodes without a shared disk would."""
    (x, y), val = make_blobs(30, seed=1), make_blobs(10, seed=2)
    model = make_model(make_config(x, dropout=dropout), seed=1)
    checkpoints = Checkpoints(out / folder / f"rank{rank}", "fp", 1, "train", main=rank == 0)

    def on_epoch(stats: EpochStats) -> None:
        if stats.epoch == kill_at:
            raise Killed

    try:
        torch.manual_seed(100 + rank)  # dropout masks differ between ranks
        result = fit(model, (x, y), val, OPTIONS, on_epoch, checkpoints=checkpoints)
    except Killed:
        return
    torch.save(
        {"state": state_copy(model), "history": [s.val_loss for s in result.history]},
        out / f"{tag}-{rank}.pt",
    )


def _worker(rank: int, port: int, out: str, runs: list[tuple]) -> None:
    """One DDP rank: the ``runs`` (kill_at, tag, dropout, checkpoint folder) one after the
    other, in one process group (every start of two ranks costs a process group)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for run in runs:
            _train(rank, Path(out), *run)
    finally:
        dist.destroy_process_group()


def _run_two(out: Path, *runs: tuple[int | None, str, float, str]) -> None:
    spawn_ranks(_worker, (_free_port(), str(out), list(runs)))


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """Two ranks trained to the end, with dropout (``whole``) and without (``nodrop``), each
    with checkpoints of its own: the second must not resume from the first's."""
    out = tmp_path_factory.mktemp("ddp")
    _run_two(out, (None, "whole", 0.1, "whole"), (None, "nodrop", 0.0, "nodrop"))
    return out


def test_two_ranks_stay_in_step(whole: Path) -> None:
    ranks = [torch.load(whole / f"whole-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank acts on the same figures
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key


def test_two_ranks_train_like_one_process(whole: Path) -> None:
    """Each rank takes half of every batch of the same permutation: the mean gradient, and so
    the model, is the one process's up to float rounding."""
    ddp = torch.load(whole / "nodrop-0.pt", weights_only=True)
    (x, y), val = make_blobs(30, seed=1), make_blobs(10, seed=2)
    single = make_model(make_config(x), seed=1)
    result = fit(single, (x, y), val, OPTIONS)
    for key, value in state_copy(single).items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-5, atol=1e-6)
    assert ddp["history"] == pytest.approx([s.val_loss for s in result.history], rel=1e-5)
    # a wrong split (each rank on every row, or on the same half) would not match
    doubled = make_model(make_config(x), seed=1)
    fit(doubled, (x, y), val, FitOptions(**{**vars(OPTIONS), "batch_size": 8}))
    assert not torch.allclose(state_copy(doubled)["head.weight"], ddp["state"]["head.weight"])


def test_killed_ranks_resume_from_rank_0s_checkpoint(whole: Path, tmp_path: Path) -> None:
    """Only rank 0 writes a checkpoint, with each rank's RNG state; rank 1 has none on its
    disk, gets rank 0's, and both end as if never killed."""
    _run_two(tmp_path, (4, "whole", 0.1, ""))
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["checkpoint.pt"]
    assert not (tmp_path / "rank1").exists()
    saved = torch.load(tmp_path / "rank0" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 3 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])

    _run_two(tmp_path, (None, "resumed", 0.1, ""))
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"resumed-{rank}.pt", weights_only=True)
        expected = torch.load(whole / f"whole-{rank}.pt", weights_only=True)
        assert resumed["history"] == expected["history"]
        for key, value in expected["state"].items():
            assert torch.equal(resumed["state"][key], value), (rank, key)
