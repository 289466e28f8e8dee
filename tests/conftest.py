"""Shared fixtures for the unit tests.

Every test runs in its own temporary working directory with MLflow pointed at one SQLite store
shared by the session (creating a store costs seconds), and with every library's telemetry off,
so that no test writes into the repository or makes a network call.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.core.model import Classifier, ModelConfig, fit_scaling
from stages.core.params import Params, parse_params
from stages.core.telemetry import QUIET_ENV

# Before any test imports MLflow or Great Expectations, which may read these at import time.
os.environ.update(QUIET_ENV)

# The models under test are tiny: extra intra-op threads only add contention (on a busy 2-core
# machine a 4-16-3 MLP trains ~20x slower with two threads than with one).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["f0", "f1", "f2", "f3"]
CLASSES = [0, 1, 2]
DOMAINS = ["base", "target"]
ROWS_PER_PAIR = 12  # rows per (domain, class)
TEST_EXPERIMENT = "unit-tests"


@pytest.fixture(scope="session")
def mlflow_dir(tmp_path_factory) -> Path:
    """The directory of the session's MLflow store (``mlflow.db``, created on first use)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_dir: Path) -> str:
    return f"sqlite:///{mlflow_dir / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path: Path, mlflow_uri: str) -> Path:
    """Telemetry off, MLflow on the session store, no DVC variables, cwd = tmp_path."""
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.fixture(scope="session")
def mlflow_client(mlflow_uri: str, mlflow_dir: Path):
    """A client on the session store, whose test experiment keeps artifacts beside the store."""
    import mlflow

    # MLflow caches the store per URI with its default artifact root (./mlruns) resolved
    # against the cwd of its first use: make that the store's directory, not the repo.
    with contextlib.chdir(mlflow_dir):
        client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
        if client.get_experiment_by_name(TEST_EXPERIMENT) is None:
            artifacts = (mlflow_dir / "artifacts").as_uri()
            client.create_experiment(TEST_EXPERIMENT, artifact_location=artifacts)
    return client


@pytest.fixture
def params() -> Params:
    return parse_params({})


def make_raw_frame(rows_per_pair: int = ROWS_PER_PAIR, seed: int = 0) -> pd.DataFrame:
    """A frame in the canonical raw schema: float features in [0, 16], ``label``, ``domain``.

    Each class has its own centre, so that the data is learnable; a ``uid`` is not included
    (tests that need row identity add one).
    """
    rng = np.random.default_rng(seed)
    parts = []
    for domain in DOMAINS:
        for label in CLASSES:
            centre = 3.0 + 5.0 * label
            x = np.clip(rng.normal(centre, 1.0, size=(rows_per_pair, len(FEATURES))), 0, 16)
            part = pd.DataFrame(x, columns=FEATURES)
            part["label"] = label
            part["domain"] = domain
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture
def raw_frame() -> pd.DataFrame:
    """72 rows: 2 domains x 3 classes x 12 rows, 4 numeric features, ``label``, ``domain``."""
    return make_raw_frame()


def make_blobs(n_per_class: int, seed: int, n_classes: int = 3, n_features: int = 4):
    """Well-separated Gaussian blobs as float32 features and int64 class indices.

    The class centres are fixed; ``seed`` draws the samples, so draws with different seeds
    are train/val samples of one problem.
    """
    centres = np.random.default_rng(0).normal(0, 4, size=(n_classes, n_features))
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.5, size=(n_per_class, n_features)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    order = rng.permutation(len(y))
    return torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])


@pytest.fixture
def blobs():
    """(train, val) tensors of a 3-class, 4-feature problem: 30 + 10 rows per class."""
    return make_blobs(30, seed=1), make_blobs(10, seed=2)


def make_config(
    x: np.ndarray | torch.Tensor,
    classes: list | None = None,
    hidden: list[int] | None = None,
    scaling: str = "per_feature",
    dropout: float = 0.0,
) -> ModelConfig:
    x = np.asarray(x, dtype=np.float64)
    mean, std = fit_scaling(x, scaling)
    n_features = x.shape[1]
    return ModelConfig(
        arch="mlp",
        n_features=n_features,
        hidden=hidden or [16],
        dropout=dropout,
        classes=classes if classes is not None else CLASSES,
        feature_names=[f"f{i}" for i in range(n_features)],
        mean=mean,
        std=std,
    )


def make_model(config: ModelConfig, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(config)


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
