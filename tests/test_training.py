"""The one training loop: learning, determinism, early stopping, and the reported summary."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, make_model, state_copy, states_equal

from stages.core.engine.inference import evaluate_loss, predict, predict_proba
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.training import (
    FitOptions,
    FitResult,
    fit,
    fit_summary,
    history_rows,
)


def _options(**changes) -> FitOptions:
    base = {"epochs": 15, "batch_size": 16, "lr": 0.01, "seed": 0, "device": "cpu"}
    return FitOptions(**(base | changes))


@pytest.fixture
def model(blobs):
    (x, _), _ = blobs
    return make_model(make_config(x), seed=0)


def test_fit_learns_separable_blobs(model, blobs) -> None:
    train, val = blobs
    before, _ = evaluate_loss(model, *val)
    result = fit(model, train, val, _options())
    after, accuracy = evaluate_loss(model, *val)
    assert after < before
    assert accuracy >= 0.9
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_fit_without_patience_runs_every_epoch(model, blobs) -> None:
    seen: list[EpochStats] = []
    result = fit(model, *blobs, _options(epochs=6, patience=None), on_epoch=seen.append)
    assert [s.epoch for s in result.history] == [1, 2, 3, 4, 5, 6]
    assert seen == result.history
    assert result.best_epoch == 6
    assert result.best is result.history[-1]
    assert result.stopped_early is False


def test_fit_is_deterministic(blobs) -> None:
    (x, _), _ = blobs
    config = make_config(x, dropout=0.1)
    runs = []
    for _ in range(2):
        model = make_model(config, seed=3)
        result = fit(model, *blobs, _options(epochs=5, seed=11))
        runs.append((state_copy(model), result.history))
    assert states_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_shuffle_seed_matters(blobs) -> None:
    (x, _), _ = blobs
    config = make_config(x)
    first, second = make_model(config, seed=3), make_model(config, seed=3)
    fit(first, *blobs, _options(epochs=2, seed=1))
    fit(second, *blobs, _options(epochs=2, seed=2))
    assert not states_equal(state_copy(first), state_copy(second))


def test_only_trainable_parameters_change(model, blobs) -> None:
    model.body.requires_grad_(False)
    body = state_copy(model.body)
    head = state_copy(model.head)
    fit(model, *blobs, _options(epochs=3))
    assert states_equal(state_copy(model.body), body)
    assert not states_equal(state_copy(model.head), head)


def test_early_stopping_restores_the_best_weights(model, blobs) -> None:
    """Val labels are permuted, so val loss rises while train loss falls."""
    train, (x_val, y_val) = blobs
    misleading = (x_val, (y_val + 1) % 3)
    result = fit(model, train, misleading, _options(epochs=60, patience=3, lr=0.02))
    assert result.stopped_early is True
    assert len(result.history) == result.best_epoch + 3
    losses = [s.val_loss for s in result.history]
    assert result.best.val_loss == min(losses)
    assert losses[-1] > result.best.val_loss
    # The model holds the best epoch's weights, not the last epoch's.
    restored_loss, restored_accuracy = evaluate_loss(model, *misleading)
    assert restored_loss == pytest.approx(result.best.val_loss, rel=1e-6)
    assert restored_accuracy == pytest.approx(result.best.val_accuracy)


def test_patience_longer_than_training_keeps_the_best(model, blobs) -> None:
    result = fit(model, *blobs, _options(epochs=8, patience=50))
    assert result.stopped_early is False
    assert len(result.history) == 8
    assert result.best.val_loss == min(s.val_loss for s in result.history)


def test_model_is_left_on_the_cpu(model, blobs) -> None:
    fit(model, *blobs, _options(epochs=1, device="auto"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.mean.device.type == "cpu"


def test_bf16_autocast_on_cpu(blobs) -> None:
    """precision=bf16 runs the forward pass in bf16 (weights stay fp32): the layers' outputs
    are bf16 during training, and the numbers differ from an fp32 run of the same seed."""
    (x, _), _ = blobs
    seen: dict[str, set] = {"bf16": set(), "fp32": set()}
    histories = {}
    for precision in seen:
        model = make_model(make_config(x), seed=0)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda _m, _i, out, p=precision: seen[p].add(out.dtype))
        result = fit(model, *blobs, _options(epochs=3, precision=precision))
        histories[precision] = [s.train_loss for s in result.history]
        assert next(model.parameters()).dtype == torch.float32
    assert seen == {"bf16": {torch.bfloat16}, "fp32": {torch.float32}}
    assert histories["bf16"] != histories["fp32"]
    assert histories["bf16"] == pytest.approx(histories["fp32"], rel=0.05)
    assert all(math.isfinite(loss) for loss in histories["bf16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_in_bf16(model, blobs) -> None:
    result = fit(model, *blobs, _options(epochs=5, device="cuda", precision="auto"))
    assert result.best.val_accuracy >= 0.9
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_evaluate_loss_and_predict(model, blobs) -> None:
    _, (x, y) = blobs
    loss, accuracy = evaluate_loss(model, x, y)
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)
    predicted = predict(model, x)
    assert torch.equal(predicted, logits.argmax(dim=1))
    assert accuracy == pytest.approx(float((predicted == y).float().mean()))
    assert model.training is False


def test_predict_proba_is_the_softmax_of_the_logits(model, blobs) -> None:
    _, (x, _) = blobs
    model.train()
    proba = predict_proba(model, x)
    assert model.training is False
    with torch.no_grad():
        logits = model(x)
    # By hand: exp(logit) / sum of exp(logits), row by row.
    by_hand = torch.exp(logits.double()) / torch.exp(logits.double()).sum(dim=1, keepdim=True)
    assert proba.dtype == torch.float64 and proba.shape == (len(x), 3)
    assert torch.allclose(proba, by_hand, rtol=1e-12, atol=0)
    assert torch.allclose(proba.sum(dim=1), torch.ones(len(x), dtype=torch.float64))
    assert torch.equal(predict(model, x), proba.argmax(dim=1))


def test_evaluate_loss_of_nothing_is_nan(model) -> None:
    loss, accuracy = evaluate_loss(model, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert math.isnan(loss) and math.isnan(accuracy)


def test_history_rows_and_summary_are_rounded() -> None:
    history = [
        EpochStats(1, 1.23456789, 2.3456789123, 0.5),
        EpochStats(2, 0.11111111, 0.9999999999, 0.833333333),
        EpochStats(3, 0.05, 1.5, 0.75),
    ]
    result = FitResult(history=history, best_epoch=2, stopped_early=True)
    rows = history_rows(result)
    assert rows[0] == {
        "epoch": 1,
        "train_loss": 1.234568,
        "val_loss": 2.345679,
        "val_accuracy": 0.5,
    }
    assert isinstance(rows[0]["epoch"], int)
    assert fit_summary(result) == {
        "epochs_run": 3,
        "best_epoch": 2,
        "stopped_early": True,
        "train_loss": 0.111111,
        "val_loss": 1.0,
        "val_accuracy": 0.833333,
    }


@pytest.fixture
def three_threads():
    """The process runs on 3 threads during the test; the session's count comes back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_fit_restores_the_thread_count(model, blobs, three_threads) -> None:
    train, val = blobs
    seen = []
    fit(model, train, val, _options(epochs=2, cpu_threads=1), lambda _: seen.append(_threads()))
    assert seen == [1, 1]  # cpu_threads holds while fit trains ...
    assert torch.get_num_threads() == 3  # ... and the caller's count is back afterwards


def test_fit_restores_the_thread_count_when_it_raises(model, blobs, three_threads) -> None:
    train, val = blobs

    def fail(stats: EpochStats) -> None:
        assert _threads() == 1
        raise RuntimeError("stopped inside fit")

    with pytest.raises(RuntimeError, match="stopped inside fit"):
        fit(model, train, val, _options(epochs=2, cpu_threads=1), fail)
    assert torch.get_num_threads() == 3


def _threads() -> int:
    return torch.get_num_threads()
