"""fit() under FSDP2 (``parallel: fsdp``): two real gloo processes on this CPU (no mocks), on
the ``transformer`` arch and a tiny Hugging Face GPT-2 classifier, whose blocks each become an
FSDP unit.

One start of two ranks runs every case one after the other (each start costs two rank
processes and a process group): ddp and fsdp on the same data and seed, an fsdp run killed
after some epochs and then resumed from its sharded checkpoint, early stopping under both, and
GPT-2 under both."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_blobs, make_config, make_model, spawn_ranks

from stages.core.common.errors import ParamsError, TrainingError
from stages.core.common.params import parse_params
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.distributed import repeated_blocks
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.training import FitOptions, fit

TRANSFORMER = {"width": 16, "depth": 2, "heads": 2, "patch_size": 2, "mlp_ratio": 2}
# grad_accum and grad_clip: the no_sync equivalent and clipping over DTensors are exercised
OPTIONS = FitOptions(
    epochs=6, batch_size=16, lr=0.003, seed=3, device="cpu", cpu_threads=1,
    grad_accum=2, grad_clip=0.5, schedule="cosine", optimizer="adamw", weight_decay=0.01,
)  # fmt: skip
# a high lr whose val loss turns back up: early stopping restores an earlier epoch's weights
EARLY = FitOptions(
    **{
        **vars(OPTIONS),
        "epochs": 12,
        "lr": 0.03,
        "patience": 2,
        "grad_clip": None,
        "schedule": "constant",
    }
)


class Killed(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model(dropout: float) -> torch.nn.Module:
    x, _ = make_blobs(30, seed=1)
    config = make_config(x, dropout=dropout).replace(arch="transformer", arch_options=TRANSFORMER)
    return make_model(config, seed=1)


def _train(rank: int, out: Path, tag: str, parallel: str, early: bool, kill_at, folder) -> None:
    """One rank's run; fsdp checkpoints live in one folder that both ranks reach."""
    (x, y), val = make_blobs(30, seed=1), make_blobs(10, seed=2)
    model = _model(dropout=0.0 if early else 0.1)
    base = EARLY if early else OPTIONS
    options = FitOptions(**{**vars(base), "parallel": parallel})
    checkpoints = None
    if folder is not None:
        checkpoints = Checkpoints(out / folder, "fp", 1, "train", main=rank == 0)

    def on_epoch(stats: EpochStats) -> None:
        if stats.epoch == kill_at:
            raise Killed

    torch.manual_seed(100 + rank)  # dropout masks differ between ranks
    try:
        result = fit(model, (x, y), val, options, on_epoch, checkpoints=checkpoints)
    except Killed:
        return
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = sorted({type(v).__name__ for v in state.values()})
    torch.save(
        {
            "state": state,
            "kinds": kinds,
            "history": [s.val_loss for s in result.history],
            "train": [s.train_loss for s in result.history],
            "best_epoch": result.best_epoch,
        },
        out / f"{tag}-{rank}.pt",
    )


RUNS = [
    ("ddp", "ddp", False, None, None),
    ("fsdp", "fsdp", False, None, "whole"),  # uninterrupted, checkpointing as it goes
    ("killed", "fsdp", False, 4, "resume"),
    ("resumed", "fsdp", False, None, "resume"),
    ("ddp-early", "ddp", True, None, None),
    ("fsdp-early", "fsdp", True, None, None),
]


def _worker(rank: int, port: int, out: str, gpt2: str) -> None:
    """One rank: the ``RUNS`` on the transformer arch, then the GPT-2 runs."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for tag, *run in RUNS:
            _train(rank, Path(out), tag, *run)
            if tag == "killed" and rank == 0:  # what the kill left for the resume
                folder = Path(out) / "resume"
                listing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
                torch.save(listing, Path(out) / "killed-listing.pt")
        _train_gpt2(rank, Path(out), gpt2)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoints) -> Path:
    """Every 2-process run of this file, in one start (each start costs two rank processes
    and a process group)."""
    out = tmp_path_factory.mktemp("fsdp")
    args = (_free_port(), str(out), str(tiny_checkpoints["gpt2"]))
    spawn_ranks(_worker, args)
    return out


def _load(out: Path, tag: str, rank: int = 0) -> dict:
    return torch.load(out / f"{tag}-{rank}.pt", weights_only=True)


def test_the_transformers_blocks_are_the_units() -> None:
    model = _model(0.0)
    assert repeated_blocks(model) == list(model.body.blocks)


def test_both_ranks_reach_the_same_loss(runs: Path) -> None:
    ranks = [_load(runs, "fsdp", r) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["train"] == ranks[1]["train"]
    assert ranks[0]["train"][-1] < ranks[0]["train"][0]  # it trained


def test_fsdp_trains_like_ddp(runs: Path) -> None:
    """Same data, seed and dropout draws: the sharded run's full final weights on rank 0 are
    ddp's up to float rounding, and a plain tensor state like today's saved models."""
    ddp, fsdp = _load(runs, "ddp"), _load(runs, "fsdp")
    assert fsdp["kinds"] == ["Tensor"]  # no DTensor: the full unsharded state
    assert fsdp["state"].keys() == ddp["state"].keys()
    for key, value in ddp["state"].items():
        torch.testing.assert_close(fsdp["state"][key], value, rtol=1e-4, atol=1e-5)
    assert fsdp["history"] == pytest.approx(ddp["history"], rel=1e-4)
    initial = _model(0.1).state_dict()
    assert not torch.allclose(fsdp["state"]["head.weight"], initial["head.weight"])


def test_an_fsdp_run_resumes_to_the_uninterrupted_weights(runs: Path) -> None:
    """Killed after epoch 4 (checkpoint of epoch 3: the kill comes before its own save), then
    resumed from the shards both ranks wrote: the same bytes as the run never killed."""
    listing = torch.load(runs / "killed-listing.pt", weights_only=True)
    assert "checkpoint.pt" in listing
    shards = [name for name in listing if name.startswith("sharded-3/")]
    assert "sharded-3/.metadata" in shards and len([s for s in shards if "distcp" in s]) == 2
    assert not any(name.startswith(("sharded-1", "sharded-2")) for name in listing)
    expected, resumed = _load(runs, "fsdp"), _load(runs, "resumed")
    assert resumed["history"] == expected["history"]
    for key, value in expected["state"].items():
        assert torch.equal(resumed["state"][key], value), key


def test_early_stopping_restores_the_best_weights_under_fsdp(runs: Path) -> None:
    ddp, fsdp = _load(runs, "ddp-early"), _load(runs, "fsdp-early")
    assert fsdp["best_epoch"] == ddp["best_epoch"] < len(fsdp["history"])
    for key, value in ddp["state"].items():
        torch.testing.assert_close(fsdp["state"][key], value, rtol=1e-4, atol=1e-5)


def test_an_unknown_parallel_is_one_line() -> None:
    (x, y), val = make_blobs(5, seed=1), make_blobs(2, seed=2)
    options = FitOptions(**{**vars(OPTIONS), "parallel": "zero"})
    with pytest.raises(TrainingError, match=r"^train\.parallel: unknown 'zero' \(ddp or fsdp\)$"):
        fit(_model(0.0), (x, y), val, options)


def test_a_bad_parallel_param_is_one_line_naming_the_key() -> None:
    with pytest.raises(ParamsError) as caught:
        parse_params({"train": {"parallel": "zero"}}, "params.yaml")
    expected = "params.yaml: train.parallel: Input should be 'ddp' or 'fsdp' (got 'zero')"
    assert str(caught.value) == expected
    assert parse_params({}).train.parallel == "ddp"
    assert parse_params({"train": {"parallel": "fsdp"}}).train.parallel == "fsdp"


@pytest.mark.parametrize(
    ("family", "blocks"), [("bert", "bert.encoder.layer"), ("gpt2", "transformer.h")]
)
def test_hugging_face_blocks_are_the_units(tiny_checkpoints, family: str, blocks: str) -> None:
    from stages.core.common.params import ModelParams
    from stages.core.modeling import text

    params = ModelParams(arch="hf", pretrained=str(tiny_checkpoints[family]))
    model, _, _ = text.load_pretrained(params, ["neg", "pos"], "text")
    expected = list(model.get_submodule(f"hf.{blocks}"))
    assert len(expected) >= 2 and repeated_blocks(model) == expected


TEXT_OPTIONS = FitOptions(
    epochs=2, batch_size=8, lr=6e-3, weight_decay=0.01, seed=0, device="cpu", cpu_threads=1,
    optimizer="adamw", grad_accum=2, grad_clip=1.0,
)  # fmt: skip


def _train_gpt2(rank: int, out: Path, folder: str) -> None:
    """One rank: a tiny GPT-2 classifier on token batches, under ddp then fsdp."""
    from tiny_text import labelled_texts

    from stages.core.common.params import ModelParams
    from stages.core.modeling import text
    from stages.core.modeling.tokenization import label_indices, tokenize

    for parallel in ("ddp", "fsdp"):
        torch.manual_seed(0)
        params = ModelParams(arch="hf", pretrained=folder)
        model, tokenizer, config = text.load_pretrained(params, ["neg", "pos"], "text")
        train, val = (
            tokenize(tokenizer, t, config.max_length, label_indices(y, ["neg", "pos"])).batches
            for t, y in (labelled_texts(32, 1), labelled_texts(8, 2))
        )
        options = FitOptions(**{**vars(TEXT_OPTIONS), "parallel": parallel})
        result = fit(model, train, val, options)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history = [s.val_loss for s in result.history]
        torch.save({"state": state, "history": history}, out / f"gpt2-{parallel}-{rank}.pt")


def test_a_gpt2_classifier_trains_under_fsdp_like_ddp(runs: Path, tiny_checkpoints) -> None:
    """Token batches, a Hugging Face model whose ``transformer.h`` blocks are the units."""
    from stages.core.common.params import ModelParams
    from stages.core.modeling import text

    torch.manual_seed(0)
    params = ModelParams(arch="hf", pretrained=str(tiny_checkpoints["gpt2"]))
    initial = text.load_pretrained(params, ["neg", "pos"], "text")[0].state_dict()
    ddp, fsdp = (_load(runs, f"gpt2-{p}") for p in ("ddp", "fsdp"))
    assert _load(runs, "gpt2-fsdp", 1)["history"] == fsdp["history"]
    assert fsdp["history"] == pytest.approx(ddp["history"], rel=1e-4)
    assert fsdp["state"].keys() == ddp["state"].keys()
    for key, value in ddp["state"].items():
        torch.testing.assert_close(fsdp["state"][key], value, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fsdp["state"]["hf.score.weight"], initial["hf.score.weight"])


def test_fsdp_in_one_process_is_plain_training() -> None:
    (x, y), val = make_blobs(10, seed=1), make_blobs(4, seed=2)
    short = {**vars(OPTIONS), "epochs": 1}
    states = []
    for parallel in ("ddp", "fsdp"):
        model = _model(0.0)
        fit(model, (x, y), val, FitOptions(**{**short, "parallel": parallel}))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[1]["head.weight"], _model(0.0).state_dict()["head.weight"])
