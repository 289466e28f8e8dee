"""Ingest: read the configured source into the canonical raw table (features, label, domain)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.errors import DataError
from stages.core.params import DataParams

LABEL = "label"
DOMAIN = "domain"
RESERVED = (LABEL, DOMAIN)


def load_source(source: str, root: Path | str = ".") -> pd.DataFrame:
    """Load ``sklearn:<name>`` or a local CSV/Parquet file (relative to ``root``) as a DataFrame."""
    if source.startswith("sklearn:"):
        return _load_sklearn(source.removeprefix("sklearn:"))
    if source.startswith(("http://", "https://", "openml:")):
        raise DataError(f"data.source: '{source}': remote sources are not supported yet")
    path = Path(root) / source
    if not path.is_file():
        raise DataError(f"data.source: file not found: {source}")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as exc:  # pandas/pyarrow raise many types; the user needs the file and cause
        raise DataError(f"{source}: cannot read: {exc}") from None
    raise DataError(f"data.source: '{source}': expected a .csv or .parquet file")


def _load_sklearn(name: str) -> pd.DataFrame:
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
    }
    if name not in loaders:
        raise DataError(f"data.source: unknown sklearn dataset '{name}' (known: {sorted(loaders)})")
    bunch = loaders[name](as_frame=True)
    frame = bunch.frame.rename(columns={"target": LABEL})
    return frame


def resolve_features(frame: pd.DataFrame, params: DataParams) -> list[str]:
    """The feature columns: those named in params, or every numeric column but label/domain."""
    if params.features is not None:
        missing = [c for c in params.features if c not in frame.columns]
        if missing:
            raise DataError(f"data.features: columns not in the source: {missing}")
        features = list(params.features)
    else:
        excluded = {params.label, params.domain_column}
        features = [
            c
            for c in frame.columns
            if c not in excluded and pd.api.types.is_numeric_dtype(frame[c])
        ]
    clash = [c for c in features if c in RESERVED]
    if clash:
        raise DataError(f"data.features: feature columns may not be named {clash}")
    if not features:
        raise DataError("data.features: the source has no numeric feature columns")
    return features


def assign_domains(
    labels: pd.Series, target_fraction: float, seed: int, base: str, target: str
) -> pd.Series:
    """Give each row the base or the target domain: disjoint, stratified by label, seeded.

    Each class (missing labels form one more group, for the validate stage to quarantine)
    sends ``round(target_fraction * size)`` of its rows to the target domain.
    """
    rng = np.random.default_rng(seed)
    domain = pd.Series(base, index=labels.index, dtype=object)
    groups = labels.astype("string").fillna("<missing>")
    for _, rows in labels.groupby(groups, sort=True):
        n_target = round(len(rows) * target_fraction)
        domain.loc[rng.permutation(rows.index.to_numpy())[:n_target]] = target
    return domain


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages read ``class 1``."""
    return value.item() if isinstance(value, np.generic) else value


def render_target(features: pd.DataFrame, transform: str) -> pd.DataFrame:
    """Render target-domain rows: ``invert`` maps x -> max - x (light-on-dark scans)."""
    if transform == "none":
        return features
    return features.max().max() - features


def build_raw_dataset(frame: pd.DataFrame, params: DataParams) -> pd.DataFrame:
    """The canonical raw table: feature columns as float, then ``label`` and ``domain``."""
    if params.label not in frame.columns:
        raise DataError(
            f"data.label: column '{params.label}' not in the source "
            f"(columns: {list(frame.columns)[:10]}{'...' if frame.shape[1] > 10 else ''})"
        )
    features = resolve_features(frame, params)
    x = frame[features].astype(np.float64)
    labels = frame[params.label]
    if params.domain_column is not None:
        if params.domain_column not in frame.columns:
            raise DataError(
                f"data.domain_column: column '{params.domain_column}' not in the source"
            )
        domain = frame[params.domain_column].astype("string").astype(object)
    else:
        domain = assign_domains(
            labels, params.target_fraction, params.seed, params.base_domain, params.target_domain
        )
        is_target = domain == params.target_domain
        # Render against the whole dataset's maximum so both domains share one scale.
        x = x.where(~is_target, render_target(x, params.target_transform))
    raw = x.copy()
    raw[LABEL] = labels.to_numpy()
    raw[DOMAIN] = domain.to_numpy()
    return raw.reset_index(drop=True)
