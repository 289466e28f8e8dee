"""The loop's engine features: schedule, clipping, accumulation, compile, NaN guard, resume
from a checkpoint to the same bytes, and the progress display."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_model, state_copy, states_equal
from torch import nn

from stages.core.common.errors import TrainingError
from stages.core.engine.checkpoints import CHECKPOINT_FILE, Checkpoints, fingerprint
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.optim import lr_factor
from stages.core.engine.progress import EpochProgress
from stages.core.engine.training import FitOptions, fit

# Every state a resume must restore matters here: dropout (global RNG), the shuffle, a cosine
# schedule with warmup, Adam's moments, accumulation and early stopping's best weights.
RICH = FitOptions(
    epochs=12,
    batch_size=8,
    lr=0.02,
    seed=5,
    patience=4,
    device="cpu",
    schedule="cosine",
    warmup_epochs=1.5,
    grad_clip=1.0,
    grad_accum=2,
)


@pytest.fixture
def config(blobs):
    (x, _), _ = blobs
    return make_config(x, hidden=[16, 8], dropout=0.2)


def _bare_loop(model: nn.Module, train, epochs: int, batch: int, lr: float, seed: int) -> None:
    """The loop as it was before the engine (shuffle, Adam, mean cross-entropy per batch)."""
    x, y = train
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def test_default_options_train_exactly_as_the_bare_loop(config, blobs) -> None:
    """Constant schedule, no clipping, no accumulation: the same bytes as before the engine."""
    ours, bare = make_model(config, seed=1), make_model(config, seed=1)
    torch.manual_seed(9)
    fit(ours, *blobs, FitOptions(epochs=4, batch_size=16, lr=0.01, seed=3, device="cpu"))
    torch.manual_seed(9)
    _bare_loop(bare, blobs[0], epochs=4, batch=16, lr=0.01, seed=3)
    assert states_equal(state_copy(ours), state_copy(bare))


def test_lr_factor() -> None:
    constant = lr_factor("constant", warmup_steps=0, total_steps=10)
    assert [constant(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    warm = lr_factor("constant", warmup_steps=4, total_steps=10)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_factor("cosine", warmup_steps=2, total_steps=12)
    assert [cosine(0), cosine(1), cosine(2)] == [0.5, 1.0, 1.0]
    assert cosine(7) == pytest.approx(0.5)  # halfway through the 10 decay steps
    assert cosine(12) == pytest.approx(0.0, abs=1e-12)
    values = [cosine(s) for s in range(2, 13)]
    assert values == sorted(values, reverse=True)


def test_schedule_changes_the_training(config, blobs) -> None:
    results = {}
    for schedule in ("constant", "cosine"):
        model = make_model(config, seed=1)
        options = FitOptions(6, 16, 0.02, seed=3, device="cpu", schedule=schedule)
        fit(model, *blobs, options)
        results[schedule] = state_copy(model)
    assert not states_equal(results["constant"], results["cosine"])


def test_cosine_schedule_ends_with_tiny_steps(config, blobs) -> None:
    """At the end of a cosine schedule the lr is near 0: the last epoch barely moves weights."""
    model = make_model(config, seed=1)
    seen = []
    options = FitOptions(10, 16, 0.05, seed=3, device="cpu", schedule="cosine")
    fit(model, *blobs, options, on_epoch=lambda _: seen.append(state_copy(model)))
    moved = [
        max((seen[i][k] - seen[i - 1][k]).abs().max().item() for k in seen[i])
        for i in range(1, len(seen))
    ]
    assert moved[-1] < 0.05 * moved[0]


def test_grad_accumulation_equals_one_big_batch(config, blobs) -> None:
    """4 batches of 8 accumulated = one batch of 32 (same permutation, same mean gradient)."""
    states = {}
    for batch, accum in ((32, 1), (8, 4), (8, 1)):
        model = make_model(config.replace(dropout=0.0), seed=1)
        fit(model, *blobs, FitOptions(5, batch, 0.01, seed=3, device="cpu", grad_accum=accum))
        states[(batch, accum)] = state_copy(model)
    big, accumulated = states[(32, 1)], states[(8, 4)]
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)
    assert not states_equal(states[(8, 1)], big)


def test_grad_clipping_limits_the_steps(config, blobs) -> None:
    """Adam ignores the gradient's scale, down to its epsilon: a clip far below it stalls."""
    start = state_copy(make_model(config, seed=1))
    moved = {}
    for clip in (None, 1e-12):
        model = make_model(config, seed=1)
        fit(model, *blobs, FitOptions(3, 16, 0.01, seed=3, device="cpu", grad_clip=clip))
        moved[clip] = max((v - start[k]).abs().max().item() for k, v in state_copy(model).items())
    assert moved[None] > 1e-2
    assert moved[1e-12] < 1e-4


def test_compile_trains_the_same_model(blobs, monkeypatch) -> None:
    """``compile`` runs the steps through a real torch.compile on the CPU (inductor, which
    builds C++ kernels with the system's compiler; seconds with a warm inductor cache, 20-45 s
    cold on a busy 2-core machine): the compiled steps train the same model as eager ones.
    Batches of 15 split the 90 rows evenly: one graph, not a second one with dynamic shapes for
    a short last batch (half the kernels to build cold)."""
    import torch._dynamo.utils
    import torch._inductor.metrics

    compiled = []
    real_compile = torch.compile

    def spy_compile(model, **kwargs):
        compiled.append((model, kwargs))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy_compile)
    (x, _), _ = blobs
    config = make_config(x, hidden=[16])
    plain, fast = make_model(config, seed=1), make_model(config, seed=1)
    options = FitOptions(2, 15, 0.01, seed=3, device="cpu")
    torch.manual_seed(0)
    fit(plain, *blobs, options)
    assert compiled == []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._inductor.metrics.reset()
    torch.manual_seed(0)
    result = fit(fast, *blobs, replace(options, compile=True))
    torch._dynamo.reset()  # no compiled frames left behind for later tests
    assert compiled == [(fast, {})]  # the default backend: inductor
    # Dynamo captured the steps and inductor generated kernels for them: a real compile ran
    assert torch._dynamo.utils.counters["frames"]["ok"] == 1  # one graph: no recompile
    assert torch._inductor.metrics.generated_kernel_count > 0
    assert result.best.val_accuracy > 0.9  # it trained
    assert list(fast.state_dict()) == list(plain.state_dict())  # no _orig_mod prefixes
    for key, value in state_copy(plain).items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_nan_val_loss_from_the_first_epoch_is_one_line(config, blobs) -> None:
    (x, y), val = blobs
    x = x.clone()
    x[0, 0] = math.nan  # one bad value poisons every weight after the first step
    model = make_model(config, seed=1)
    with pytest.raises(TrainingError) as caught:
        fit(model, (x, y), val, FitOptions(20, 16, 0.01, patience=5, device="cpu"))
    assert str(caught.value) == (
        "val loss is nan after epoch 1 (train loss nan): the training diverged or the data "
        "holds non-finite values; try a lower lr (now 0.01)"
    )


def _poison_val_after(val: tuple[torch.Tensor, torch.Tensor], epoch: int):
    """From the epoch after ``epoch`` on, the val loss is NaN (fit uses CPU tensors as given)."""

    def on_epoch(stats: EpochStats) -> None:
        if stats.epoch == epoch:
            val[0][0, 0] = math.nan

    return on_epoch


def test_nan_later_without_early_stopping_is_an_error(config, blobs) -> None:
    train, val = blobs[0], (blobs[1][0].clone(), blobs[1][1])
    with pytest.raises(TrainingError, match=r"^val loss is nan at epoch 6, the epoch kept: "):
        options = FitOptions(6, 16, 0.01, device="cpu")  # the val tensor is used in place
        fit(make_model(config), train, val, options, _poison_val_after(val, 3))


def test_nan_later_with_early_stopping_keeps_the_best_finite_epoch(config, blobs) -> None:
    train, val = blobs[0], (blobs[1][0].clone(), blobs[1][1])
    options = FitOptions(20, 16, 0.01, patience=2, device="cpu")
    result = fit(make_model(config), train, val, options, _poison_val_after(val, 3))
    assert (result.best_epoch, len(result.history), result.stopped_early) == (3, 5, True)
    assert math.isfinite(result.best.val_loss)


def test_empty_val_split_is_an_error(config, blobs) -> None:
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TrainingError, match="the val split has no rows"):
        fit(make_model(config), blobs[0], empty, FitOptions(1, 16, 0.01, device="cpu"))


# --- resume -------------------------------------------------------------------------------


class Killed(Exception):
    """Stands in for SIGKILL at the end of an epoch (the e2e test kills for real)."""


def _kill_at(epoch: int):
    def on_epoch(stats: EpochStats) -> None:
        if stats.epoch == epoch:
            raise Killed

    return on_epoch


def _checkpoints(tmp_path: Path, every: int | None = 1, params=None) -> Checkpoints:
    return Checkpoints(tmp_path / "ckpt", fingerprint(params or {"lr": 1}, []), every, "train")


def _uninterrupted(config, blobs, options: FitOptions = RICH):
    model = make_model(config, seed=1)
    torch.manual_seed(77)  # dropout draws from the global RNG
    result = fit(model, *blobs, options)
    return state_copy(model), result


def test_resume_after_a_kill_gives_the_same_bytes(config, blobs, tmp_path, capsys) -> None:
    expected_state, expected = _uninterrupted(config, blobs)
    assert expected.history[-1].epoch > 6  # the kill below falls mid-run

    first = make_model(config, seed=1)
    torch.manual_seed(77)
    with pytest.raises(Killed):
        fit(first, *blobs, RICH, _kill_at(6), checkpoints=_checkpoints(tmp_path))
    saved = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert saved["epoch"] == 5  # killed during epoch 6, before its checkpoint
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CHECKPOINT_FILE]

    # A new process: other initial weights and RNG state, all replaced by the checkpoint.
    second = make_model(config, seed=99)
    torch.manual_seed(12345)
    seen: list[EpochStats] = []
    result = fit(second, *blobs, RICH, seen.append, checkpoints=_checkpoints(tmp_path))
    assert (
        capsys.readouterr().out
        == f"train: resuming from epoch 5 ({tmp_path}/ckpt/{CHECKPOINT_FILE})\n"
    )
    assert states_equal(state_copy(second), expected_state)
    assert result.history == expected.history
    assert (result.best_epoch, result.stopped_early) == (
        expected.best_epoch,
        expected.stopped_early,
    )
    assert [s.epoch for s in seen] == list(range(6, expected.history[-1].epoch + 1))


def test_resume_needs_the_same_fingerprint(config, blobs, tmp_path, capsys) -> None:
    model = make_model(config, seed=1)
    with pytest.raises(Killed):
        fit(model, *blobs, RICH, _kill_at(4), checkpoints=_checkpoints(tmp_path))
    other = _checkpoints(tmp_path, params={"lr": 2})
    assert other.latest() is None
    assert capsys.readouterr().out == (
        f"train: not resuming {tmp_path}/ckpt/{CHECKPOINT_FILE}: made with other params, "
        "code or data\n"
    )
    expected_state, _ = _uninterrupted(config, blobs)
    fresh = make_model(config, seed=1)
    torch.manual_seed(77)
    fit(fresh, *blobs, RICH, checkpoints=_checkpoints(tmp_path, params={"lr": 2}))
    assert states_equal(state_copy(fresh), expected_state)  # started over, from epoch 1


def test_a_corrupt_checkpoint_is_skipped_with_a_warning(config, blobs, tmp_path, capsys) -> None:
    path = tmp_path / "ckpt" / CHECKPOINT_FILE
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint at all")
    expected_state, _ = _uninterrupted(config, blobs)
    model = make_model(config, seed=1)
    torch.manual_seed(77)
    fit(model, *blobs, RICH, checkpoints=_checkpoints(tmp_path))
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1
    assert warning[0].startswith(f"train: warning: skipping the unreadable checkpoint {path} (")
    assert states_equal(state_copy(model), expected_state)


def test_checkpoints_follow_the_cadence_and_clear(config, blobs, tmp_path) -> None:
    saved_epochs = []
    checkpoints = _checkpoints(tmp_path, every=3)
    original_save = checkpoints.save

    def record(state):
        saved_epochs.append(state["epoch"])
        original_save(state)

    checkpoints.save = record
    options = replace(RICH, patience=None, epochs=10)
    fit(make_model(config, seed=1), *blobs, options, checkpoints=checkpoints)
    assert saved_epochs == [3, 6, 9]
    checkpoints.clear()
    assert not (tmp_path / "ckpt").exists()


def test_checkpoints_off(config, blobs, tmp_path) -> None:
    checkpoints = _checkpoints(tmp_path, every=None)
    fit(make_model(config, seed=1), *blobs, replace(RICH, epochs=3), checkpoints=checkpoints)
    assert not (tmp_path / "ckpt").exists()
    assert checkpoints.latest() is None


def test_checkpoint_holds_every_state(config, blobs, tmp_path) -> None:
    checkpoints = _checkpoints(tmp_path)
    with pytest.raises(Killed):
        fit(make_model(config), *blobs, RICH, _kill_at(3), checkpoints=checkpoints)
    state = torch.load(checkpoints.path, weights_only=True)
    assert state["fingerprint"] == checkpoints.fingerprint
    assert {"model", "optimizer", "scheduler", "shuffle_rng", "rng", "history"} <= set(state)
    assert {"best_loss", "best_epoch", "best_state"} <= set(state)
    assert state["scheduler"]["last_epoch"] == 2 * 6  # 2 epochs x 6 steps (90 rows, 16 a step)


def test_fingerprint_tracks_params_inputs_but_not_cadence(tmp_path) -> None:
    data = tmp_path / "train.parquet"
    data.write_bytes(b"rows")
    base = fingerprint({"train": {"lr": 0.1, "checkpoint_every": 5}}, [data])
    assert fingerprint({"train": {"lr": 0.1, "checkpoint_every": 1}}, [data]) == base
    assert fingerprint({"train": {"lr": 0.2, "checkpoint_every": 5}}, [data]) != base
    data.write_bytes(b"other rows")
    assert fingerprint({"train": {"lr": 0.1, "checkpoint_every": 5}}, [data]) != base
    folder = tmp_path / "models"
    (folder / "base").mkdir(parents=True)
    (folder / "base" / "config.json").write_text("{}")
    before = fingerprint({}, [folder])
    (folder / "base" / "config.json").write_text('{"arch": "mlp"}')
    assert fingerprint({}, [folder]) != before


# --- progress -------------------------------------------------------------------------------


def test_progress_lines_when_not_on_a_terminal(config, blobs) -> None:
    stream = io.StringIO()
    with EpochProgress("train", total=3, stream=stream, live=False) as progress:
        progress.update(EpochStats(1, 0.9, 0.8, 0.5))
        progress.update(EpochStats(2, 0.5, 0.4, 0.75))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train: epoch 1/3 loss 0.9000 val_loss 0.8000 val_acc 0.500 (")
    assert lines[1].startswith("train: epoch 2/3 loss 0.5000 val_loss 0.4000 val_acc 0.750 (")
    assert lines[1].endswith(" s)") and ", eta " in lines[1]


def test_progress_bar_on_a_terminal(capsys) -> None:
    with EpochProgress("finetune", total=4, done=1, live=True) as progress:
        progress.update(EpochStats(2, 0.25, 0.5, 0.875))
    err = capsys.readouterr().err
    assert "finetune:  50%" in err and "2/4" in err
    assert "loss=0.2500" in err and "val_acc=0.875" in err


def test_fit_shows_one_line_per_epoch_off_a_terminal(config, blobs, capsys) -> None:
    fit(make_model(config), *blobs, FitOptions(3, 16, 0.01, device="cpu"), progress="train")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" loss")[0] for line in lines] == [
        "train: epoch 1/3",
        "train: epoch 2/3",
        "train: epoch 3/3",
    ]


def test_fit_is_quiet_without_a_label(config, blobs, capsys) -> None:
    fit(make_model(config), *blobs, FitOptions(2, 16, 0.01, device="cpu"))
    assert capsys.readouterr() == ("", "")
