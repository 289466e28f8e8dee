"""Fine-tune strategies (head, full, lora through peft) on each architecture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, state_copy, states_equal
from safetensors.torch import load_file
from test_architectures import TRANSFORMER, _bars, _image_config

from stages.core.common.errors import ParamsError
from stages.core.common.params import LoraParams, parse_params
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.architectures import count_parameters
from stages.core.modeling.finetuning import adapt, fine_tune, optimizer_groups
from stages.core.modeling.lora import adaptable_layers, merge_lora, resolve_targets
from stages.core.modeling.model import Classifier, load_model, save_model

ARCHS = {
    "mlp": {},
    "cnn": {"channels": [4, 8], "kernel_size": 3},
    "transformer": TRANSFORMER,
}
LORA = LoraParams(rank=2, alpha=4.0)


def _inverted(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target domain: the same bars, light-on-dark."""
    x, y = data
    return 2.0 - x, y


@pytest.fixture(scope="module")
def bases() -> dict[str, Classifier]:
    """One base model per arch, trained on the bars."""
    models = {}
    for arch, options in ARCHS.items():
        torch.manual_seed(0)
        model = Classifier(_image_config(arch, [4, 4], options))
        lr = 0.003 if arch == "transformer" else 0.01
        fit(model, _bars(30, 1), _bars(10, 2), FitOptions(30, 16, lr, device="cpu"))
        models[arch] = model
    return models


def _lora_size(model: Classifier, targets: list[str], rank: int) -> int:
    total = 0
    for name in targets:
        layer = model.body.get_submodule(name)
        if isinstance(layer, torch.nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        else:  # Conv2d: A is a conv to `rank` channels, B a 1x1 conv back
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += rank * layer.in_channels * kernel + layer.out_channels * rank
    return total


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("strategy", ["head", "full", "lora"])
def test_each_strategy_on_each_arch(bases, arch: str, strategy: str) -> None:
    base = bases[arch]
    before = state_copy(base)
    model = adapt(base, 2, strategy, seed=1, lora=LORA, arch=arch)
    head_size = base.head.in_features * 2 + 2
    expected = {
        "head": head_size,
        "full": count_parameters(base),
        "lora": head_size + _lora_size(base, resolve_targets(base.body, arch, None), 2),
    }[strategy]
    lr = 0.005 if strategy == "full" else 0.02  # every weight moves under full: go gently
    result = fit(model, _inverted(_bars(5, 3)), _inverted(_bars(10, 4)), FitOptions(40, 64, lr))
    assert result.trainable_parameters == expected
    tuned = merge_lora(model)
    assert type(tuned) is Classifier
    assert list(tuned.state_dict()) == list(base.state_dict())  # no adapter or wrapper keys
    assert states_equal(state_copy(base), before)  # the base model is never touched
    body_changed = not states_equal(state_copy(tuned.body), state_copy(base.body))
    assert body_changed == (strategy != "head")
    # Whatever it trains, it learns the shots of the inverted bars.
    assert result.history[-1].train_loss < 0.7 * result.history[0].train_loss


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_changes_eval_predictions_and_merges_exactly(bases, arch: str) -> None:
    """The adapters act at inference (no fused path bypasses them), and merging keeps that."""
    model = adapt(bases[arch], 2, "lora", seed=1, lora=LORA, arch=arch)
    fit(model, _inverted(_bars(5, 3)), _inverted(_bars(5, 4)), FitOptions(20, 64, 0.02))
    probe = _inverted(_bars(10, 6))[0]
    model.eval()
    with torch.no_grad():
        adapted = model(probe)
        with model.disable_adapter():
            without = model(probe)
        merged = merge_lora(model).eval()(probe)
    # Same new head in both: any difference comes from the adapters in the body.
    assert (adapted - without).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_default_lora_targets_per_arch(bases) -> None:
    assert resolve_targets(bases["mlp"].body, "mlp", None) == ["0"]
    assert resolve_targets(bases["cnn"].body, "cnn", None) == ["layers.0", "layers.3"]
    assert resolve_targets(bases["transformer"].body, "transformer", None) == [
        f"blocks.{i}.{layer}"
        for i in (0, 1)
        for layer in ("attn.qkv", "attn.out", "mlp.fc", "mlp.out")
    ]


def test_named_lora_targets_match_by_suffix(bases) -> None:
    body = bases["transformer"].body
    assert resolve_targets(body, "transformer", ["embed", "attn.out"]) == [
        "embed",
        "blocks.0.attn.out",
        "blocks.1.attn.out",
    ]
    assert resolve_targets(body, "transformer", ["blocks.1.mlp.fc"]) == ["blocks.1.mlp.fc"]
    assert adaptable_layers(body)[0] == "embed"


def test_a_lora_target_that_matches_nothing_is_one_line(bases) -> None:
    with pytest.raises(ParamsError) as caught:
        adapt(
            bases["transformer"], 2, "lora", 1, LoraParams(target_modules=["q_proj"]), "transformer"
        )
    message = str(caught.value)
    assert message.startswith(
        "finetune.lora.target_modules: 'q_proj' matches no Linear or Conv2d layer of the "
        "transformer body (its layers: embed, blocks.0.attn.qkv, "
    )
    assert "\n" not in message
    with pytest.raises(ParamsError, match="'ln1' matches no Linear"):  # a LayerNorm
        resolve_targets(bases["transformer"].body, "transformer", ["ln1"])


def test_full_with_a_lower_body_lr(bases) -> None:
    base = bases["mlp"]
    shots, val = _inverted(_bars(5, 3)), _inverted(_bars(5, 4))
    changes = {}
    for body_lr in (None, 1e-7):
        model = adapt(base, 2, "full", seed=1)
        groups = optimizer_groups(model, body_lr)
        fit(model, shots, val, FitOptions(20, 64, 0.01), param_groups=groups)
        changes[body_lr] = max(
            (a - b).abs().max().item()
            for a, b in zip(model.body.parameters(), base.body.parameters(), strict=True)
        )
    assert changes[None] > 1e-2
    assert changes[1e-7] < 1e-5  # Adam moves each weight by about lr per step: 20 x 1e-7
    assert optimizer_groups(base, None) is None


def _frame(data, features: list[str]) -> pd.DataFrame:
    x, y = data
    frame = pd.DataFrame(x.numpy().astype(np.float64), columns=features)
    frame["label"] = y.numpy()
    return frame


def test_fine_tune_with_lora_saves_a_model_that_loads_without_peft(bases, tmp_path: Path) -> None:
    base = bases["transformer"]
    config = _image_config("transformer", [4, 4], TRANSFORMER)
    params = parse_params(
        {
            "finetune": {"strategy": "lora", "epochs": 10, "lora": {"rank": 2}},
            "train": {"device": "cpu"},
        }
    )
    shots = _frame(_inverted(_bars(3, 3)), config.feature_names)
    val = _frame(_inverted(_bars(3, 4)), config.feature_names)
    tuned, tuned_config, result = fine_tune(base, config, shots, val, params, seed=3)
    assert result.trainable_parameters == 2 * 2 * (16 + 48 + 16 + 16 + 16 + 32 + 32 + 16) + (
        16 * 2 + 2
    )
    folder = tmp_path / "model"  # not the working directory, which a save would replace
    save_model(folder, tuned, tuned_config)
    assert not any("lora" in key for key in load_file(str(folder / "model.safetensors")))
    script = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "from stages.core.modeling.model import load_model\n"
        f"model, config = load_model({str(folder)!r})\n"
        "print(config.arch, sum(p.numel() for p in model.parameters()))\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["transformer", str(count_parameters(tuned))]
    loaded, _ = load_model(folder)
    probe = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(probe), tuned.eval()(probe), rtol=0, atol=0)


def test_head_and_full_do_not_import_peft(tmp_path: Path) -> None:
    """peft costs seconds to import: only the lora strategy pays for it."""
    script = (
        "import sys, torch\n"
        "from stages.core.modeling.finetuning import adapt, fine_tune\n"
        "from stages.core.modeling.model import Classifier, ModelConfig\n"
        "config = ModelConfig('mlp', 2, [4], 0.0, [0, 1], ['a', 'b'], [0.0, 0.0], [1.0, 1.0])\n"
        "for strategy in ('head', 'full'):\n"
        "    adapt(Classifier(config), 2, strategy, 0)\n"
        "print('peft' in sys.modules)\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_lora_run_resumes_to_the_same_bytes(bases, tmp_path: Path, capsys) -> None:
    """A LoRA fine-tune killed mid-run resumes from its checkpoint (adapters, the head copy,
    Adam, LoRA dropout's RNG) and merges into the same weights as an uninterrupted run."""
    from stages.core.engine.checkpoints import Checkpoints, fingerprint

    config = _image_config("transformer", [4, 4], TRANSFORMER)
    params = parse_params(
        {
            "finetune": {
                "strategy": "lora",
                "epochs": 8,
                "lr": 0.02,
                "schedule": "cosine",
                "lora": {"rank": 2, "dropout": 0.2},
            },
            "train": {"device": "cpu"},
        }
    )
    shots = _frame(_inverted(_bars(3, 3)), config.feature_names)
    val = _frame(_inverted(_bars(3, 4)), config.feature_names)
    expected, _, _ = fine_tune(bases["transformer"], config, shots, val, params, seed=3)

    def checkpoints() -> Checkpoints:
        return Checkpoints(tmp_path / "finetune", fingerprint({}, []), 2, "finetune")

    def kill_at_5(stats) -> None:
        if stats.epoch == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(bases["transformer"], config, shots, val, params, 3, kill_at_5,
                  checkpoints=checkpoints())  # fmt: skip
    torch.manual_seed(1234)  # a new process's RNG: the checkpoint restores the real one
    resumed, _, result = fine_tune(
        bases["transformer"], config, shots, val, params, 3, checkpoints=checkpoints()
    )
    assert "finetune: resuming from epoch 4 " in capsys.readouterr().out
    assert [s.epoch for s in result.history] == list(range(1, 9))
    assert states_equal(state_copy(resumed), state_copy(expected))
