"""The classifier, its device/precision choice, and how it is saved (safetensors + JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from stages.core.common.data_params import DataParams
from stages.core.common.errors import DataError, ModelError, one_line
from stages.core.common.io import read_json, write_dir_atomic, write_json
from stages.core.common.params import ModelParams
from stages.core.common.schema import LABEL, RESERVED
from stages.core.modeling.architectures import build_body

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
    # The arch's own hyperparameters (model.cnn or model.transformer); empty for the mlp, whose
    # hidden widths and dropout are the fields above (older config.json files have no such key).
    arch_options: dict = field(default_factory=dict)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig(**(asdict(self) | changes))


class Classifier(nn.Module):
    """Standardise raw features, the arch's ``body`` (stages.core.modeling.architectures),
    then a linear ``head`` over the classes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(config.mean), persistent=False)
        self.register_buffer("std", torch.tensor(config.std), persistent=False)
        self.body, width = build_body(
            config.arch,
            config.n_features,
            config.hidden,
            config.dropout,
            config.image_shape,
            config.arch_options,
        )
        self.head = nn.Linear(width, len(config.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - self.mean) / self.std))


def base_config(frame: pd.DataFrame, model: ModelParams, data: DataParams) -> ModelConfig:
    """The config of a new model trained on ``frame`` (a split in the canonical schema): every
    non-reserved column is a feature, scaled as ``model.scaling`` says from these rows only."""
    features = [c for c in frame.columns if c not in RESERVED]
    mean, std = fit_scaling(frame[features].to_numpy(), model.scaling)
    return ModelConfig(
        arch=model.arch,
        n_features=len(features),
        hidden=list(model.hidden),
        dropout=model.dropout,
        classes=sorted(frame[LABEL].unique().tolist()),
        feature_names=features,
        mean=mean,
        std=std,
        image_shape=data.image_shape,
        trained_on={"domain": data.base_domain, "rows": len(frame)},
        arch_options=model.arch_options(),
    )


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


def save_model(directory: Path | str, model: Classifier, config: ModelConfig) -> None:
    """Write ``directory`` as a whole, holding ``model.safetensors`` and ``config.json`` only:
    a crash or kill while saving leaves the old model or the new one, never new weights
    beside an old config (stages.core.common.io.write_dir_atomic)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS_FILE))
        write_json(folder / CONFIG_FILE, asdict(config))

    write_dir_atomic(directory, write)


def load_model(directory: Path | str) -> tuple[Classifier, ModelConfig]:
    """Rebuild a saved model (on the CPU) and its config.

    A missing, unreadable or mismatched file is a ModelError naming it. Config files written
    before the arch registry (mlp only, no ``arch_options``) still load.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelError(f"{path}: not found; run the stage that writes {directory} first")
    try:
        config = ModelConfig(**read_json(config_path))
    except (ValueError, TypeError) as exc:  # bad JSON is a ValueError; unknown keys a TypeError
        raise ModelError(f"{config_path}: not a model config ({one_line(exc)})") from None
    model = Classifier(config)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types, or OSError
        raise ModelError(f"{weights_path}: cannot read the weights ({one_line(exc)})") from None
    try:
        found = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ModelError(f"{weights_path}: does not match {CONFIG_FILE}: {one_line(exc)}") from None
    if found.missing_keys or found.unexpected_keys:
        raise ModelError(
            f"{weights_path}: does not match {CONFIG_FILE}: missing {found.missing_keys[:3]}, "
            f"unexpected {found.unexpected_keys[:3]}"
        )
    return model, config


def encode(frame: pd.DataFrame, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows and class indices of a split, in the model's feature and class order.

    A missing label or one outside the model's classes is a DataError (one line)."""
    missing = frame[LABEL].isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{LABEL}: {int(missing.sum())} of {len(frame)} rows have no label (first: row "
            f"{int(np.argmax(missing))}); the validate stage quarantines such rows: rerun it "
            "(dvc repro) rather than feeding unvalidated data"
        )
    index = {label: i for i, label in enumerate(config.classes)}
    unknown = sorted(set(frame[LABEL]) - set(index), key=str)
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the model's classes {config.classes}")
    x = torch.tensor(frame[config.feature_names].to_numpy(np.float32))
    y = torch.tensor(frame[LABEL].map(index).to_numpy(np.int64))
    return x, y
