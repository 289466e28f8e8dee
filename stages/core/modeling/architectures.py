"""The architecture registry: each arch builds a ``body`` that maps standardised feature rows to
one vector per row; the classifier puts a linear ``head`` over it (stages.core.modeling.model).

- ``mlp``: ReLU layers of ``model.hidden`` widths (the default).
- ``cnn``: 2-D convolutions over ``data.image_shape`` ([H, W] grey or [C, H, W]).
- ``transformer``: a small ViT-style encoder, nanoGPT-style pre-norm blocks written from plain
  ``nn.Linear`` layers and ``scaled_dot_product_attention``, with a class token. Its tokens are
  image patches when there is an ``image_shape``, else one token per feature (tabular data).

The transformer is deliberately not ``nn.TransformerEncoderLayer``: in eval mode that layer
takes a fused path that reads its weights directly and so bypasses LoRA-wrapped layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from stages.core.common.errors import DataError

ARCHS = ("mlp", "cnn", "transformer")


@dataclass(frozen=True)
class Arch:
    """How to build one architecture's body, and what LoRA adapts in it by default."""

    build: Callable[..., tuple[nn.Module, int]]
    # Layer names (matched as peft does: the name or its last dotted parts) that LoRA adapts
    # when finetune.lora.target_modules is null; None means every Linear and Conv2d of the body.
    lora_targets: tuple[str, ...] | None


def image_grid(image_shape: Sequence[int] | None, n_features: int) -> tuple[int, int, int]:
    """``[H, W]`` or ``[C, H, W]`` as (C, H, W), checked against the number of features
    (the flattened pixels in C, H, W order)."""
    if image_shape is None:
        raise DataError("data.image_shape: this architecture needs the image shape ([H, W])")
    grid = (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)
    channels, height, width = grid
    if channels * height * width != n_features:
        raise DataError(
            f"data.image_shape: {list(image_shape)} holds {channels * height * width} values "
            f"but the data has {n_features} feature columns"
        )
    return channels, height, width


def build_mlp(n_features: int, hidden: Sequence[int], dropout: float, **_) -> tuple[nn.Module, int]:
    """ReLU layers of the given widths (the seed's network: 64-128-64 on the digits)."""
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers), width


class ConvNet(nn.Module):
    """Conv-ReLU(-Dropout)-MaxPool blocks over the image, flattened at the end."""

    def __init__(
        self,
        grid: tuple[int, int, int],
        channels: Sequence[int],
        kernel_size: int,
        dropout: float,
    ):
        super().__init__()
        self.grid = grid
        depth, height, width = grid
        layers: list[nn.Module] = []
        for size in channels:
            layers += [nn.Conv2d(depth, size, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            depth = size
        self.layers = nn.Sequential(*layers)
        self.out_features = depth * height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.view(len(x), *self.grid)).flatten(1)


def build_cnn(
    n_features: int,
    dropout: float,
    image_shape: Sequence[int] | None,
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 3,
    **_,
) -> tuple[nn.Module, int]:
    body = ConvNet(image_grid(image_shape, n_features), channels, kernel_size, dropout)
    return body, body.out_features


class SelfAttention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection, SDPA, one ``out`` projection."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = (
            t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
            for t in self.qkv(x).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return self.drop(self.out(y.transpose(1, 2).reshape(batch, tokens, width)))


class FeedForward(nn.Module):
    """``fc`` to ``mlp_ratio`` x width, GELU, ``out`` back to width."""

    def __init__(self, width: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, mlp_ratio * width)
        self.out = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Tokens (image patches, or one per feature) -> ``embed`` -> class token + positions ->
    pre-norm blocks -> final LayerNorm of the class token."""

    def __init__(
        self,
        n_features: int,
        grid: tuple[int, int, int] | None,
        width: int,
        depth: int,
        heads: int,
        patch_size: int,
        mlp_ratio: int,
        dropout: float,
    ):
        super().__init__()
        self.grid = grid
        self.patch_size = patch_size
        if grid is None:
            n_tokens, token_size = n_features, 1
        else:
            channels, height, width_px = grid
            n_tokens = (height // patch_size) * (width_px // patch_size)
            token_size = channels * patch_size * patch_size
        self.embed = nn.Linear(token_size, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, n_tokens + 1, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        # nanoGPT's: small normal weights, zero biases, residual projections scaled by depth.
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(".out") else 0.02
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) -> (batch, tokens, token_size)."""
        if self.grid is None:
            return x.unsqueeze(-1)
        channels, height, width = self.grid
        p = self.patch_size
        patches = x.view(len(x), channels, height // p, p, width // p, p)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(len(x), -1, channels * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.tokens(x))
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        tokens = self.drop(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


def build_transformer(
    n_features: int,
    dropout: float,
    image_shape: Sequence[int] | None,
    width: int = 32,
    depth: int = 2,
    heads: int = 2,
    patch_size: int = 2,
    mlp_ratio: int = 2,
    **_,
) -> tuple[nn.Module, int]:
    grid = None if image_shape is None else image_grid(image_shape, n_features)
    if grid is not None and (grid[1] % patch_size or grid[2] % patch_size):
        raise DataError(
            f"model.transformer.patch_size: {patch_size} does not divide the image "
            f"({grid[1]}x{grid[2]}, data.image_shape)"
        )
    body = Transformer(n_features, grid, width, depth, heads, patch_size, mlp_ratio, dropout)
    return body, width


REGISTRY: dict[str, Arch] = {
    "mlp": Arch(build_mlp, lora_targets=None),
    "cnn": Arch(build_cnn, lora_targets=None),
    "transformer": Arch(build_transformer, lora_targets=("qkv", "out", "fc")),
}


def build_body(
    arch: str,
    n_features: int,
    hidden: Sequence[int],
    dropout: float,
    image_shape: Sequence[int] | None,
    options: dict,
) -> tuple[nn.Module, int]:
    """The body of ``arch`` and the width of its output vector."""
    if arch not in REGISTRY:
        raise DataError(f"model.arch: unknown architecture {arch!r} (known: {list(REGISTRY)})")
    return REGISTRY[arch].build(
        n_features=n_features,
        hidden=hidden,
        dropout=dropout,
        image_shape=image_shape,
        **options,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """How many parameters ``module`` holds (only those that train, if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
