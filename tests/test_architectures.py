"""The architecture registry: mlp (unchanged), cnn and the ViT-style transformer."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_blobs, make_config, make_model, state_copy, states_equal
from torch import nn

from stages.core.common.errors import DataError, ParamsError
from stages.core.common.params import parse_params
from stages.core.engine.inference import evaluate_loss
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.architectures import (
    REGISTRY,
    Transformer,
    build_body,
    count_parameters,
    image_grid,
)
from stages.core.modeling.model import Classifier, ModelConfig, base_config, load_model, save_model

TRANSFORMER = {"width": 16, "depth": 2, "heads": 2, "patch_size": 2, "mlp_ratio": 2}


def _image_config(arch: str, image_shape: list[int], options: dict, classes=(0, 1)) -> ModelConfig:
    n_features = int(np.prod(image_shape))
    return ModelConfig(
        arch=arch,
        n_features=n_features,
        hidden=[8],
        dropout=0.0,
        classes=list(classes),
        feature_names=[f"p{i}" for i in range(n_features)],
        mean=[0.0] * n_features,
        std=[1.0] * n_features,
        image_shape=image_shape,
        arch_options=options,
    )


def _bars(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4x4 grey images: class 0 a bright horizontal bar, class 1 a vertical one, plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            image = rng.normal(0, 0.3, size=(4, 4))
            where = rng.integers(0, 4)
            if label == 0:
                image[where, :] += 2
            else:
                image[:, where] += 2
            images.append(image.reshape(-1))
            labels.append(label)
    order = rng.permutation(len(labels))
    x = torch.tensor(np.array(images)[order], dtype=torch.float32)
    return x, torch.tensor(labels)[order]


def test_registry_names_the_three_archs() -> None:
    assert list(REGISTRY) == ["mlp", "cnn", "transformer"]


def test_mlp_is_the_seed_network_with_the_same_numbers() -> None:
    """Same layers, names and random draws as before the registry: default metrics keep."""
    (x, _), _ = make_blobs(5, seed=0), None
    config = make_config(x, hidden=[8, 6])
    model = make_model(config, seed=7)
    torch.manual_seed(7)
    expected = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU())
    head = nn.Linear(6, 3)
    assert list(model.state_dict()) == [
        "body.0.weight",
        "body.0.bias",
        "body.2.weight",
        "body.2.bias",
        "head.weight",
        "head.bias",
    ]
    assert states_equal(state_copy(model.body), state_copy(expected))
    assert states_equal(state_copy(model.head), state_copy(head))


def test_image_grid() -> None:
    assert image_grid([8, 8], 64) == (1, 8, 8)
    assert image_grid([3, 4, 2], 24) == (3, 4, 2)
    with pytest.raises(DataError, match=r"^data\.image_shape: \[8, 8\] holds 64 values but "):
        image_grid([8, 8], 63)
    with pytest.raises(DataError, match=r"^data\.image_shape: "):
        image_grid(None, 64)


def test_cnn_layers_and_output() -> None:
    config = _image_config("cnn", [8, 8], {"channels": [4, 6], "kernel_size": 3})
    model = Classifier(config)
    convs = [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 4, (3, 3)),
        (4, 6, (3, 3)),
    ]
    # two 2x2 pools: 8x8 -> 2x2, so 6 channels x 4 positions reach the head
    assert model.head.in_features == 24
    assert model(torch.zeros(5, 64)).shape == (5, 2)


def test_cnn_reads_channels_first_pixels() -> None:
    """[C, H, W]: the first H*W features are channel 0."""
    config = _image_config("cnn", [2, 3, 3], {"channels": [1], "kernel_size": 1})
    model = Classifier(config)
    conv = model.body.layers[0]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        conv.bias.zero_()
    x = torch.cat([torch.arange(9.0), -torch.ones(9)]).unsqueeze(0)
    # channel 0 (0..8 as 3x3) through ReLU and a 2x2 max pool: max of [[0, 1], [3, 4]]
    assert model.body(x).tolist() == [[4.0]]


def test_patch_tokens_follow_channels_height_width() -> None:
    body = Transformer(
        n_features=2 * 4 * 4, grid=(2, 4, 4), width=8, depth=1, heads=2, patch_size=2,
        mlp_ratio=2, dropout=0.0,
    )  # fmt: skip
    x = torch.arange(32.0).unsqueeze(0)  # channel c, row r, column k holds 16c + 4r + k
    tokens = body.tokens(x)
    assert tokens.shape == (1, 4, 8)
    # first patch: rows 0-1, columns 0-1 of channel 0, then the same of channel 1
    assert tokens[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    # second patch: columns 2-3
    assert tokens[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert tokens[0, 2].tolist() == [8, 9, 12, 13, 24, 25, 28, 29]


def test_tabular_transformer_has_one_token_per_feature() -> None:
    body, width = build_body("transformer", 5, [], 0.0, None, TRANSFORMER)
    assert width == 16
    assert body.embed.in_features == 1
    assert body.pos.shape == (1, 6, 16)  # 5 features + the class token
    assert body.tokens(torch.zeros(3, 5)).shape == (3, 5, 1)
    assert body(torch.zeros(3, 5)).shape == (3, 16)


def test_default_transformer_size_on_the_digits() -> None:
    """2 blocks of width 32 (mlp ratio 2) on 2x2 patches of 8x8 digits: counted by hand."""
    params = parse_params({"model": {"arch": "transformer"}, "data": {"image_shape": [8, 8]}})
    frame = pd.DataFrame(np.zeros((10, 64)), columns=[f"p{i}" for i in range(64)])
    frame["label"] = list(range(10))
    model = Classifier(base_config(frame, params.model, params.data))
    embed, tokens = 4 * 32 + 32, 1 + 16
    block = 2 * 64 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)
    expected = embed + 32 + tokens * 32 + 2 * block + 64 + (32 * 10 + 10)
    assert count_parameters(model) == expected == 18218
    assert not any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules())
    linear = [n for n, m in model.body.named_modules() if isinstance(m, nn.Linear)]
    assert linear == [
        "embed",
        "blocks.0.attn.qkv",
        "blocks.0.attn.out",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.out",
        "blocks.1.attn.qkv",
        "blocks.1.attn.out",
        "blocks.1.mlp.fc",
        "blocks.1.mlp.out",
    ]


def test_attention_mixes_the_patches() -> None:
    """The class token sees every patch: changing one patch changes the output."""
    torch.manual_seed(0)
    config = _image_config("transformer", [4, 4], TRANSFORMER)
    model = Classifier(config).eval()
    x = torch.randn(1, 16)
    changed = x.clone()
    changed[0, 15] += 3.0  # the last pixel: only the last patch holds it
    with torch.no_grad():
        assert not torch.allclose(model(x), model(changed))


def test_count_parameters_trainable_only() -> None:
    model = make_model(make_config(np.zeros((2, 4)), hidden=[8]))
    model.body.requires_grad_(False)
    assert count_parameters(model) == (4 * 8 + 8) + (8 * 3 + 3)
    assert count_parameters(model, trainable_only=True) == 8 * 3 + 3


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("mlp", {}),
        ("cnn", {"channels": [8], "kernel_size": 3}),
        ("transformer", TRANSFORMER),
    ],
)
def test_each_arch_learns_images(arch: str, options: dict) -> None:
    train, val = _bars(40, seed=1), _bars(15, seed=2)
    config = _image_config(arch, [4, 4], options)
    model = make_model(config, seed=0)
    before, _ = evaluate_loss(model, *val)
    lr = 0.003 if arch == "transformer" else 0.01
    fit(model, train, val, FitOptions(epochs=40, batch_size=16, lr=lr, device="cpu"))
    after, accuracy = evaluate_loss(model, *val)
    assert after < before
    assert accuracy >= 0.9


def test_tabular_transformer_learns_blobs(blobs) -> None:
    train, val = blobs
    config = make_config(train[0]).replace(arch="transformer", arch_options=TRANSFORMER)
    model = make_model(config, seed=0)
    fit(model, train, val, FitOptions(epochs=25, batch_size=16, lr=0.003, device="cpu"))
    assert evaluate_loss(model, *val)[1] >= 0.9


@pytest.mark.parametrize(
    ("arch", "options"),
    [("cnn", {"channels": [4, 4], "kernel_size": 3}), ("transformer", TRANSFORMER)],
)
def test_round_trip_of_each_arch(tmp_path: Path, arch: str, options: dict) -> None:
    config = _image_config(arch, [4, 4], options, classes=["a", "b"])
    model = make_model(config, seed=3).eval()
    save_model(tmp_path, model, config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["arch"] == arch and saved["arch_options"] == options
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config == config
    probe = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(probe), model(probe), rtol=0, atol=0)


def test_an_mlp_config_from_before_the_registry_still_loads(tmp_path: Path) -> None:
    config = make_config(np.random.default_rng(0).normal(size=(6, 4)), hidden=[5])
    model = make_model(config)
    save_model(tmp_path, model, config)
    old = asdict(config)
    del old["arch_options"]  # what main wrote before the registry
    (tmp_path / "config.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config == config
    assert states_equal(state_copy(loaded), state_copy(model))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"model": {"arch": "rnn"}},
            "params.yaml: model.arch: Input should be 'mlp', 'cnn', 'transformer' or 'hf'",
        ),
        (
            {"model": {"arch": "cnn"}, "data": {"image_shape": None}},
            "params.yaml: model.arch: cnn needs data.image_shape ([H, W] or [C, H, W]), "
            "which is null",
        ),
        (
            {"model": {"arch": "transformer", "transformer": {"patch_size": 3}}},
            "params.yaml: model.transformer.patch_size: 3 does not divide data.image_shape [8, 8]",
        ),
        (
            {"model": {"transformer": {"width": 30, "heads": 4}}},
            "params.yaml: model.transformer: width 30 must be a multiple of heads 4",
        ),
        ({"model": {"cnn": {"kernel_size": 2}}}, "params.yaml: model.cnn.kernel_size: "),
        ({"model": {"cnn": {"channels": [8, 0]}}}, "params.yaml: model.cnn.channels: "),
        ({"data": {"image_shape": [64]}}, "params.yaml: data.image_shape: "),
        ({"data": {"image_shape": [8, 0]}}, "params.yaml: data.image_shape: "),
    ],
)
def test_bad_arch_params_are_one_line(raw: dict, expected: str) -> None:
    base = {"data": {"image_shape": [8, 8]}}
    merged = {k: base.get(k, {}) | raw.get(k, {}) for k in base.keys() | raw.keys()}
    with pytest.raises(ParamsError) as caught:
        parse_params(merged)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_tabular_data_may_use_the_transformer_but_not_the_cnn() -> None:
    assert parse_params({"model": {"arch": "transformer"}}).model.arch == "transformer"
    with pytest.raises(ParamsError, match="cnn needs data.image_shape"):
        parse_params({"model": {"arch": "cnn"}})
