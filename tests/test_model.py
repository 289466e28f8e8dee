"""The classifier, feature scaling, device choice, and saving (safetensors + config.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, make_blobs, make_config, make_model, state_copy, states_equal
from safetensors.torch import load_file

from stages.core.common.errors import DataError, ParamsError
from stages.core.engine.devices import resolve_device, resolve_precision
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Classifier,
    ModelConfig,
    encode,
    fit_scaling,
    load_model,
    save_model,
)


@pytest.fixture
def config() -> ModelConfig:
    x, _ = make_blobs(10, seed=0)
    return make_config(x, hidden=[8, 6]).replace(image_shape=[2, 2], trained_on={"rows": 30})


def test_global_scaling_is_one_min_max_for_all_features() -> None:
    x = np.array([[0.0, 4.0, 2.0], [16.0, 8.0, 1.0]])
    mean, std = fit_scaling(x, "global")
    assert mean == [0.0, 0.0, 0.0]
    assert std == [16.0, 16.0, 16.0]
    scaled = (x - np.array(mean)) / np.array(std)
    assert scaled.min() == 0 and scaled.max() == 1


def test_global_scaling_of_a_constant_input_keeps_unit_scale() -> None:
    mean, std = fit_scaling(np.full((4, 2), 3.0), "global")
    assert (mean, std) == ([3.0, 3.0], [1.0, 1.0])


def test_per_feature_scaling_standardises_each_column() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(5, 2, 200), rng.normal(-3, 0.1, 200), np.full(200, 7.0)])
    mean, std = fit_scaling(x, "per_feature")
    assert len(mean) == len(std) == 3
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-6)
    assert std[2] == 1.0  # constant column: scale 1, not 0
    scaled = (x - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(scaled[:, :2].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(scaled[:, :2].std(axis=0), 1, atol=1e-5)
    np.testing.assert_array_equal(scaled[:, 2], 0)


def test_classifier_layers(config: ModelConfig) -> None:
    model = Classifier(config)
    linear = [m for m in model.body if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(4, 8), (8, 6)]
    assert (model.head.in_features, model.head.out_features) == (6, 3)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.body)
    with_dropout = Classifier(config.replace(dropout=0.2))
    assert sum(isinstance(m, torch.nn.Dropout) for m in with_dropout.body) == 2
    assert model(torch.zeros(5, 4)).shape == (5, 3)


def test_classifier_standardises_its_input(config: ModelConfig) -> None:
    """A model scaled with mean m and std s, fed x, equals the same weights with no scaling
    fed (x - m) / s, worked out here by hand."""
    scaled = make_model(config.replace(mean=[1.0, 2.0, -1.0, 0.0], std=[2.0, 4.0, 0.5, 1.0]))
    unscaled = Classifier(config.replace(mean=[0.0] * 4, std=[1.0] * 4))
    unscaled.load_state_dict(scaled.state_dict())
    raw = torch.tensor([[3.0, 10.0, 0.0, 5.0], [1.0, 2.0, -1.0, 0.0]])
    by_hand = torch.tensor([[1.0, 2.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(scaled(raw), unscaled(by_hand))
    assert not torch.allclose(scaled(raw), unscaled(raw))


def test_config_replace_returns_a_new_config(config: ModelConfig) -> None:
    changed = config.replace(classes=["a", "b"], trained_on={"domain": "target"})
    assert changed.classes == ["a", "b"] and changed.trained_on == {"domain": "target"}
    assert config.classes == [0, 1, 2] and config.trained_on == {"rows": 30}
    assert changed.mean == config.mean


def test_save_writes_safetensors_and_config(tmp_path: Path, config: ModelConfig) -> None:
    model = make_model(config)
    save_model(tmp_path / "model", model, config)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((tmp_path / "model" / CONFIG_FILE).read_text()) == asdict(config)
    weights = load_file(str(tmp_path / "model" / WEIGHTS_FILE))
    assert weights.keys() == model.state_dict().keys()
    assert {"mean", "std"}.isdisjoint(weights)  # normalisation lives in config.json


def test_round_trip_restores_weights_config_and_predictions(tmp_path: Path, config) -> None:
    (x, y), val = make_blobs(10, seed=0), make_blobs(4, seed=1)
    model = make_model(config)
    fit(model, (x, y), val, FitOptions(epochs=3, batch_size=8, lr=0.01, device="cpu"))
    save_model(tmp_path, model, config)
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config == config
    assert states_equal(state_copy(loaded), state_copy(model))
    probe = torch.randn(20, 4) * 4
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(probe), model(probe), rtol=0, atol=0)


def test_same_model_gives_byte_identical_files(tmp_path: Path, config: ModelConfig) -> None:
    save_model(tmp_path / "a", make_model(config, seed=1), config)
    save_model(tmp_path / "b", make_model(config, seed=1), config)
    loaded, loaded_config = load_model(tmp_path / "a")
    save_model(tmp_path / "c", loaded, loaded_config)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        first = (tmp_path / "a" / name).read_bytes()
        assert (tmp_path / "b" / name).read_bytes() == first
        assert (tmp_path / "c" / name).read_bytes() == first
    save_model(tmp_path / "d", make_model(config, seed=2), config)
    other = (tmp_path / "d" / WEIGHTS_FILE).read_bytes()
    assert other != (tmp_path / "a" / WEIGHTS_FILE).read_bytes()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_save_replaces_a_whole_directory(tmp_path: Path, config: ModelConfig) -> None:
    target = tmp_path / "model"
    save_model(target, make_model(config, seed=1), config)
    (target / "stale.txt").write_text("from an older layout")
    second = make_model(config, seed=2)
    save_model(target, second, config.replace(trained_on={"rows": 99}))
    assert sorted(_files(target)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert {oct(p.stat().st_mode & 0o777) for p in [target, *target.iterdir()]} == {
        "0o755",
        "0o644",
    }
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    loaded, loaded_config = load_model(target)
    assert states_equal(state_copy(loaded), state_copy(second))
    assert loaded_config.trained_on == {"rows": 99}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old folder left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_save_failing_between_the_writes_leaves_the_old_model(
    tmp_path: Path, config: ModelConfig, monkeypatch, exchange: bool
) -> None:
    from stages.core.common import io
    from stages.core.modeling import model as model_module

    if not exchange:  # the fallback where the system cannot swap two paths in one step
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    first = make_model(config, seed=1)
    save_model(target, first, config)
    before = _files(target)
    save_model(target, first, config)  # an overwrite works on either path
    assert _files(target) == before

    def killed(*args, **kwargs):  # the weights are written, the config is not
        raise KeyboardInterrupt("killed between model.safetensors and config.json")

    monkeypatch.setattr(model_module, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(target, make_model(config, seed=2), config.replace(classes=[7, 8, 9]))
    assert _files(target) == before  # the old model, complete and unchanged
    assert states_equal(state_copy(load_model(target)[0]), state_copy(first))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_save_killed_midway_leaves_the_old_model_and_the_next_save_cleans_up(
    tmp_path: Path, config: ModelConfig
) -> None:
    target = tmp_path / "model"
    save_model(target, make_model(config, seed=1), config)
    before = _files(target)
    # A real SIGKILL after the weights are written: nothing of ours runs after it.
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_model\n"
        "from stages.core.modeling import model as m\n"
        "from stages.core.common.io import read_json\n"
        "config = m.ModelConfig(**read_json(sys.argv[1] + '/config.json'))\n"
        "m.write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "m.save_model(sys.argv[1], make_model(config, seed=2), config)\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(target)], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _files(target) == before
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".model.")  # hidden, not the model
    assert (leftovers[0] / WEIGHTS_FILE).is_file()  # the killed save got that far
    second = make_model(config, seed=3)
    save_model(target, second, config)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert states_equal(state_copy(load_model(target)[0]), state_copy(second))


def test_string_classes_survive_the_round_trip(tmp_path: Path, config: ModelConfig) -> None:
    config = config.replace(classes=["cat", "dog", "eel"])
    save_model(tmp_path, make_model(config), config)
    assert load_model(tmp_path)[1].classes == ["cat", "dog", "eel"]


def test_encode_follows_the_config_order(config: ModelConfig) -> None:
    config = config.replace(classes=["b", "a", "c"], feature_names=["f2", "f0", "f1", "f3"])
    frame = pd.DataFrame(
        {"f0": [1, 2], "f1": [3, 4], "f2": [5, 6], "f3": [7, 8], "label": ["a", "c"]}
    )
    x, y = encode(frame, config)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.tolist() == [[5, 1, 3, 7], [6, 2, 4, 8]]
    assert y.tolist() == [1, 2]


def test_encode_rejects_missing_labels_in_one_line(config: ModelConfig) -> None:
    frame = pd.DataFrame(
        {"f0": [0.0] * 3, "f1": [0.0] * 3, "f2": [0.0] * 3, "f3": [0.0] * 3, "label": [1, None, 2]}
    )
    with pytest.raises(DataError) as caught:
        encode(frame, config)
    message = str(caught.value)
    assert message.startswith("label: 1 of 3 rows have no label (first: row 1); ")
    assert "\n" not in message


def test_encode_rejects_unknown_labels(config: ModelConfig) -> None:
    frame = pd.DataFrame({"f0": [0.0], "f1": [0.0], "f2": [0.0], "f3": [0.0], "label": [7]})
    with pytest.raises(DataError, match=r"labels \[7\] are not among the model's classes"):
        encode(frame, config)


def _simulate_cuda(monkeypatch, devices: int, build: str | None = "12.8") -> None:
    """What PyTorch reports on a machine with ``devices`` GPUs and a build for CUDA ``build``
    (None: a CPU-only build), whatever this machine has: the choice reads only these."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.version, "cuda", build)


def test_resolve_device(monkeypatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    _simulate_cuda(monkeypatch, devices=0)
    assert resolve_device("auto") == torch.device("cpu")
    _simulate_cuda(monkeypatch, devices=1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
@pytest.mark.parametrize(
    ("build", "described"), [(None, "a CPU-only build"), ("12.8", "CUDA 12.8")]
)
def test_cuda_without_cuda_is_one_line(monkeypatch, requested: str, build, described) -> None:
    """No GPU seen, with a CPU-only build or with PyPI's CUDA build on a machine without one."""
    _simulate_cuda(monkeypatch, devices=0, build=build)
    with pytest.raises(ParamsError) as caught:
        resolve_device(requested)
    assert str(caught.value) == (
        f"train.device: {requested!r}, but PyTorch sees no CUDA device "
        f"(torch {torch.__version__}, {described}); use auto or cpu"
    )


def test_cuda_index_past_the_devices_is_one_line(monkeypatch) -> None:
    _simulate_cuda(monkeypatch, devices=2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ParamsError) as caught:
        resolve_device("cuda:2")
    assert str(caught.value) == "train.device: 'cuda:2', but there are 2 CUDA device(s)"


def test_cuda_under_torchrun_is_the_local_rank_gpu(monkeypatch) -> None:
    _simulate_cuda(monkeypatch, devices=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ParamsError, match=r"there are 2 CUDA device\(s\)$"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_past_the_real_devices_is_one_line() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ParamsError, match=rf"there are {count} CUDA device\(s\)$"):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [
        ("auto", "cpu", None),
        ("auto", "cuda", torch.bfloat16),
        ("fp32", "cuda", None),
        ("fp32", "cpu", None),
        ("bf16", "cpu", torch.bfloat16),
        ("bf16", "cuda", torch.bfloat16),
    ],
)
def test_resolve_precision(requested: str, device: str, expected) -> None:
    assert resolve_precision(requested, torch.device(device)) == expected
