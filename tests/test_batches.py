"""Token batches for fit(): padding per batch, seeded length-grouped order, dict inputs through
the one loop (resume included), AdamW's groups and the linear schedule."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import spawn_ranks, state_copy, states_equal
from torch import nn

from stages.core.engine.batches import TokenBatches
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.inference import predict_proba
from stages.core.engine.optim import build_optimizer, lr_factor
from stages.core.engine.training import FitOptions, fit

PAD = 0


class BagOfWords(nn.Module):
    """Mean of the unpadded tokens' embeddings, then a linear head: takes the dict a token
    batch gives, as a Hugging Face model does."""

    def __init__(self, vocab: int = 20, width: int = 8, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(self.drop(pooled))


def _texts(n: int, seed: int) -> TokenBatches:
    """Texts of 2-12 tokens; class 1 holds token 3 somewhere, class 0 token 4."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(n):
        length = int(torch.randint(2, 13, (1,), generator=generator))
        row = torch.randint(5, 20, (length,), generator=generator).tolist()
        row[int(torch.randint(0, length, (1,), generator=generator))] = 3 if i % 2 else 4
        rows.append(row)
        labels.append(i % 2)
    return TokenBatches.from_ids(rows, labels, PAD)


def test_a_batch_is_padded_to_its_longest_row() -> None:
    data = TokenBatches.from_ids([[5, 6], [7, 8, 9, 10, 11], [12]], [0, 1, 0], PAD)
    batch = data.inputs(torch.tensor([0, 2]))
    assert batch["input_ids"].tolist() == [[5, 6], [12, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert data.inputs(torch.tensor([1]))["input_ids"].shape == (1, 5)


def test_on_cuda_the_width_is_a_multiple_of_8() -> None:
    data = replace(TokenBatches.from_ids([[5] * 9, [6] * 3], [0, 1], PAD), pad_multiple=8)
    batch = data.inputs(torch.tensor([0, 1]))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [9, 3]


def test_the_order_is_a_seeded_length_grouped_permutation() -> None:
    data = _texts(300, seed=1)
    order = data.order(torch.Generator().manual_seed(7), batch_size=10)
    assert sorted(order.tolist()) == list(range(300))
    again = data.order(torch.Generator().manual_seed(7), batch_size=10)
    assert torch.equal(order, again)
    other = data.order(torch.Generator().manual_seed(8), batch_size=10)
    assert not torch.equal(order, other)
    # Grouping by length leaves much less padding than a plain shuffle.
    lengths = data.lengths[order]
    grouped = sum(int(b.max()) * len(b) for b in lengths.split(10))
    plain = data.lengths[torch.randperm(300, generator=torch.Generator().manual_seed(7))]
    shuffled = sum(int(b.max()) * len(b) for b in plain.split(10))
    assert grouped < 0.8 * shuffled
    assert data.padded_tokens(10) < shuffled


def test_the_partial_batch_stays_last() -> None:
    data = _texts(25, seed=2)
    order = data.order(torch.Generator().manual_seed(0), batch_size=10)
    # With 25 rows in one window, the 5 shortest rows form the last, partial batch.
    assert data.lengths[order[20:]].max() <= data.lengths[order[:20]].min()


OPTIONS = FitOptions(epochs=30, batch_size=16, lr=0.05, seed=3, patience=None, device="cpu")


def test_fit_trains_on_token_batches() -> None:
    torch.manual_seed(0)
    model = BagOfWords()
    result = fit(model, _texts(96, seed=3), _texts(40, seed=4), OPTIONS)
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    assert result.history[-1].val_accuracy >= 0.9
    proba = predict_proba(model, _texts(40, seed=4), batch_size=7)
    assert proba.shape == (40, 2)
    assert torch.allclose(proba.sum(1), torch.ones(40, dtype=torch.float64))
    # Batched prediction returns rows in their own order, not the length order it ran in.
    assert (proba.argmax(1) == _texts(40, seed=4).y).float().mean() >= 0.9


class Killed(Exception):
    """Stands in for SIGKILL at the end of an epoch."""


def _kill_at(epoch: int):
    def on_epoch(stats) -> None:
        if stats.epoch == epoch:
            raise Killed

    return on_epoch


def test_token_batches_resume_to_the_same_bytes(tmp_path) -> None:
    rich = replace(
        OPTIONS,
        epochs=8,
        schedule="linear",
        warmup_epochs=1,
        grad_accum=2,
        grad_clip=1.0,
        optimizer="adamw",
        weight_decay=0.01,
        batch_size=8,
    )
    train, val = _texts(64, seed=5), _texts(16, seed=6)
    torch.manual_seed(0)
    whole = BagOfWords()
    fit(whole, train, val, rich)
    torch.manual_seed(0)
    with pytest.raises(Killed):
        fit(
            BagOfWords(),
            train,
            val,
            rich,
            _kill_at(5),
            checkpoints=Checkpoints(tmp_path, "k", 2, "t"),
        )
    torch.manual_seed(99)  # a new process: other weights and RNG, all replaced by the checkpoint
    resumed = BagOfWords()
    fit(resumed, train, val, rich, checkpoints=Checkpoints(tmp_path, "k", 2, "t"))
    assert states_equal(state_copy(whole), state_copy(resumed))


def test_adamw_decays_matrices_only() -> None:
    model = BagOfWords()
    model.embed.requires_grad_(False)
    optimizer, trained = build_optimizer(model, None, replace(OPTIONS, optimizer="adamw"))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, kept = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [(2, 8)]
    assert [p.shape for p in kept["params"]] == [(2,)] and kept["weight_decay"] == 0.0
    assert len(trained) == 2


def test_an_unknown_optimizer_is_an_error() -> None:
    from stages.core.common.errors import TrainingError

    with pytest.raises(TrainingError, match="unknown optimizer 'sgd'"):
        build_optimizer(BagOfWords(), None, replace(OPTIONS, optimizer="sgd"))


def test_linear_schedule() -> None:
    factor = lr_factor("linear", warmup_steps=2, total_steps=6)
    assert [factor(s) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


# --- two real gloo processes: each takes its share of every token batch -------------------


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = BagOfWords()
        model.drop.p = 0.0  # the same masks on one process and two
        fit(model, _texts(64, seed=7), _texts(16, seed=8), DDP_OPTIONS)
        torch.save(state_copy(model), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


DDP_OPTIONS = replace(OPTIONS, epochs=3, batch_size=8, grad_accum=2, optimizer="adamw")


def test_two_processes_train_token_batches_like_one(tmp_path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_ddp_worker, (port, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states_equal(*ranks)
    torch.manual_seed(0)
    single = BagOfWords()
    single.drop.p = 0.0
    fit(single, _texts(64, seed=7), _texts(16, seed=8), DDP_OPTIONS)
    expected = state_copy(single)
    assert all(torch.allclose(ranks[0][k], expected[k], atol=1e-5) for k in expected)
