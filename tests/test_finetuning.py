"""Fine-tuning: few-shot sampling, adapting a base model, and the few-shot options."""

from __future__ import annotations

from dataclasses import fields, make_dataclass

import pandas as pd
import pytest
import torch
from conftest import make_blobs, make_config, make_model, make_raw_frame, state_copy, states_equal

from stages.core.common.errors import DataError
from stages.core.common.params import FinetuneParams, TrainParams, parse_params
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.finetuning import adapt, few_shot_options, sample_shots


@pytest.fixture
def target_train() -> pd.DataFrame:
    frame = make_raw_frame(rows_per_pair=10, seed=4)
    frame = frame[frame["domain"] == "target"].reset_index(drop=True)
    return frame.assign(uid=range(100, 100 + len(frame)))


def test_sample_shots_draws_k_rows_of_every_class(target_train: pd.DataFrame) -> None:
    shots = sample_shots(target_train, shots_per_class=4, seed=0)
    assert shots["label"].value_counts().to_dict() == {0: 4, 1: 4, 2: 4}
    assert shots["uid"].is_unique
    assert set(shots["uid"]) <= set(target_train["uid"])
    assert list(shots.columns) == list(target_train.columns)
    assert isinstance(shots.index, pd.RangeIndex)
    assert shots["label"].is_monotonic_increasing


def test_sample_shots_rows_are_unchanged(target_train: pd.DataFrame) -> None:
    shots = sample_shots(target_train, shots_per_class=2, seed=1)
    original = target_train.set_index("uid").loc[shots["uid"]].reset_index()
    pd.testing.assert_frame_equal(shots[original.columns], original)


def test_sample_shots_is_seeded(target_train: pd.DataFrame) -> None:
    first = sample_shots(target_train, 3, seed=7)
    pd.testing.assert_frame_equal(first, sample_shots(target_train, 3, seed=7))
    assert set(sample_shots(target_train, 3, seed=8)["uid"]) != set(first["uid"])


def test_sample_shots_can_take_every_row(target_train: pd.DataFrame) -> None:
    shots = sample_shots(target_train, 10, seed=0)
    assert set(shots["uid"]) == set(target_train["uid"])


def _too_few(target_train: pd.DataFrame) -> str:
    short = target_train.drop(index=target_train.index[target_train["label"] == 1][:7])
    with pytest.raises(DataError) as caught:
        sample_shots(short, shots_per_class=5, seed=0)
    return str(caught.value)


def test_too_few_rows_for_the_shots(target_train: pd.DataFrame) -> None:
    message = _too_few(target_train)
    assert message.startswith("finetune.shots_per_class: class ")
    assert message.endswith(" has only 3 rows in the target train split (< 5)")
    assert "\n" not in message


def test_too_few_rows_message_names_the_class_plainly(target_train: pd.DataFrame) -> None:
    assert _too_few(target_train) == (
        "finetune.shots_per_class: class 1 has only 3 rows in the target train split (< 5)"
    )


@pytest.fixture
def base_model():
    (x, y), val = make_blobs(20, seed=1), make_blobs(5, seed=2)
    config = make_config(x, hidden=[12, 8])
    model = make_model(config, seed=0)
    fit(model, (x, y), val, FitOptions(epochs=3, batch_size=16, lr=0.01, device="cpu"))
    return model


@pytest.mark.parametrize("strategy", ["head", "full"])
def test_adapt_copies_the_base_with_a_new_head(base_model, strategy: str) -> None:
    before = state_copy(base_model)
    model = adapt(base_model, n_classes=5, strategy=strategy, seed=1)
    assert model is not base_model
    assert model.head.out_features == 5
    assert model.head.in_features == base_model.head.in_features
    assert states_equal(state_copy(model.body), state_copy(base_model.body))
    assert states_equal(state_copy(base_model), before)
    assert all(p.requires_grad for p in model.head.parameters())
    assert all(p.requires_grad == (strategy == "full") for p in model.body.parameters())
    assert all(p.requires_grad for p in base_model.parameters())


def test_adapt_head_is_seeded(base_model) -> None:
    first = adapt(base_model, 3, "head", seed=5)
    second = adapt(base_model, 3, "head", seed=5)
    third = adapt(base_model, 3, "head", seed=6)
    assert states_equal(state_copy(first.head), state_copy(second.head))
    assert not states_equal(state_copy(first.head), state_copy(third.head))


def _tune(base_model, strategy: str):
    shots, val = make_blobs(5, seed=3), make_blobs(5, seed=4)
    # The target domain: the same classes, a shifted input.
    shots = (shots[0] * -1 + 2, shots[1])
    val = (val[0] * -1 + 2, val[1])
    model = adapt(base_model, 3, strategy, seed=0)
    body, head = state_copy(model.body), state_copy(model.head)
    options = FitOptions(epochs=20, batch_size=64, lr=0.01, device="cpu")
    fit(model, shots, val, options)
    return model, body, head


def test_head_strategy_trains_only_the_head(base_model) -> None:
    model, body, head = _tune(base_model, "head")
    assert states_equal(state_copy(model.body), body)
    assert not states_equal(state_copy(model.head), head)


def test_full_strategy_trains_the_body_too(base_model) -> None:
    model, body, head = _tune(base_model, "full")
    changed = [k for k in body if not torch.equal(body[k], model.body.state_dict()[k])]
    assert sorted(changed) == sorted(body)
    assert not states_equal(state_copy(model.head), head)


def test_few_shot_options_follow_params() -> None:
    params = parse_params(
        {
            "finetune": {"epochs": 7, "lr": 0.5, "batch_size": 4, "seed": 9, "weight_decay": 0.1},
            "train": {"device": "cpu", "precision": "fp32", "patience": 3, "cpu_threads": 2},
        }
    )
    options = few_shot_options(params)
    expected = {
        "epochs": 7,
        "batch_size": 4,
        "lr": 0.5,
        "weight_decay": 0.1,
        "seed": 9,
        "patience": None,  # no early stopping: selecting on val would use more labels
        "device": "cpu",
        "precision": "fp32",
        "cpu_threads": 2,
    }
    assert {key: getattr(options, key) for key in expected} == expected


def test_few_shot_options_take_every_fit_option_from_finetune_else_train() -> None:
    params = parse_params(
        {
            "finetune": {
                "epochs": 7, "batch_size": 4, "lr": 0.5, "weight_decay": 0.1, "seed": 9,
                "schedule": "cosine", "warmup_epochs": 1.5, "grad_clip": 2.0, "grad_accum": 3,
            },
            "train": {
                "epochs": 70, "batch_size": 40, "lr": 0.05, "weight_decay": 0.2, "seed": 90,
                "schedule": "constant", "warmup_epochs": 0.5, "grad_clip": 9.0, "grad_accum": 2,
                "device": "cpu", "precision": "fp32", "patience": 3, "cpu_threads": 2,
                "compile": True, "optimizer": "adamw", "eval_batch_size": 16, "parallel": "fsdp",
            },
        }
    )  # fmt: skip
    options = few_shot_options(params)
    for option in fields(FitOptions):
        value = getattr(options, option.name)
        if option.name == "patience":
            assert value is None
        elif option.name in FinetuneParams.model_fields:
            assert value == getattr(params.finetune, option.name), option.name
        else:
            assert option.name in TrainParams.model_fields, f"{option.name}: in no section"
            assert value == getattr(params.train, option.name), option.name
        if option.name != "patience":  # each option set here, not left at its default
            assert value != option.default, option.name
    assert few_shot_options(params, seed=4).seed == 4


def test_a_fit_option_added_to_the_train_section_reaches_the_few_shot_runs(monkeypatch) -> None:
    from pydantic import create_model

    from stages.core.engine import training

    # A new option, as a later change would add it: a FitOptions field and a train key.
    extended = make_dataclass(
        "FitOptions", [("label_smoothing", float, 0.0)], bases=(FitOptions,), frozen=True
    )
    monkeypatch.setattr(training, "FitOptions", extended)
    train = create_model("TrainParams", __base__=TrainParams, label_smoothing=(float, 0.0))
    params = parse_params({"train": {"device": "cpu"}})
    params = params.model_copy(update={"train": train(device="cpu", label_smoothing=0.1)})
    options = few_shot_options(params)
    assert options.label_smoothing == 0.1
    assert options.device == "cpu" and options.epochs == params.finetune.epochs
