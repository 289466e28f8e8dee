"""The classifier, its device/precision choice, and how it is saved (safetensors + JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from stages.core.data import LABEL
from stages.core.errors import DataError
from stages.core.io import read_json, write_atomic, write_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained model and feed it raw feature rows."""

    arch: str
    n_features: int
    hidden: list[int]
    dropout: float
    classes: list
    feature_names: list[str]
    mean: list[float]
    std: list[float]
    image_shape: list[int] | None = None
    trained_on: dict = field(default_factory=dict)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig(**(asdict(self) | changes))


class Classifier(nn.Module):
    """Standardise raw features, a ReLU MLP ``body``, then a linear ``head`` over classes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(config.mean), persistent=False)
        self.register_buffer("std", torch.tensor(config.std), persistent=False)
        layers: list[nn.Module] = []
        width = config.n_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, len(config.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - self.mean) / self.std))


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters the optimizer updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit_scaling(x: np.ndarray, mode: str) -> tuple[list[float], list[float]]:
    """Shift and scale for raw features, from training rows only.

    ``global``: one min-max scale for every feature (pixels; keeps an inverted image in range).
    ``per_feature``: standardise each column (tabular data); constant columns get scale 1.
    """
    n_features = x.shape[1]
    if mode == "global":
        low, high = float(x.min()), float(x.max())
        return [low] * n_features, [high - low if high > low else 1.0] * n_features
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-8] = 1.0
    return mean.astype(np.float32).tolist(), std.astype(np.float32).tolist()


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when it is available, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for ``auto``; None means full fp32."""
    if requested == "bf16" or (requested == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def save_model(directory: Path | str, model: Classifier, config: ModelConfig) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    write_json(directory / CONFIG_FILE, asdict(config))


def load_model(directory: Path | str) -> tuple[Classifier, ModelConfig]:
    """Rebuild a saved model (on the CPU) and its config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = ModelConfig(**read_json(directory / CONFIG_FILE))
    model = Classifier(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model, config


def encode(frame: pd.DataFrame, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows and class indices of a split, in the model's feature and class order."""
    index = {label: i for i, label in enumerate(config.classes)}
    unknown = sorted(set(frame[LABEL]) - set(index), key=str)
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the model's classes {config.classes}")
    x = torch.tensor(frame[config.feature_names].to_numpy(np.float32))
    y = torch.tensor(frame[LABEL].map(index).to_numpy(np.int64))
    return x, y
