"""Ingest: a loaded source -> the canonical raw table (features, label, domain), or for a text
dataset (``data.text_column``) the table ``text``, ``label``, ``domain``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.core.common.data_params import DataParams
from stages.core.common.errors import DataError
from stages.core.common.numbers import number_like
from stages.core.common.schema import DOMAIN, LABEL, RESERVED, TEXT
from stages.core.data.text import clean_code_points


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


def skipped_columns(frame: pd.DataFrame, params: DataParams) -> list[str]:
    """Columns that are neither features, label nor domain column: with ``data.features:
    null``, the non-numeric ones (a column with a stray word in it lands here). For a text
    dataset, every column but the text, label and domain columns."""
    if params.text_column is not None:
        used = {params.text_column, params.label, params.domain_column}
        return [str(c) for c in frame.columns if c not in used]
    used = {params.label, params.domain_column, *resolve_features(frame, params)}
    return [str(c) for c in frame.columns if c not in used]


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


def render_target(
    features: pd.DataFrame, transform: str, bounds: tuple[float, float] | None
) -> pd.DataFrame:
    """Render target-domain rows: ``invert`` reflects each value inside ``bounds``,
    x -> low + high - x (light-on-dark scans; 16 - x for pixels in [0, 16]).

    ``bounds`` is ``validate.feature_range``; without one, the extent of the finite values.
    Bad values cannot move the bounds given by params, and a value outside them stays outside,
    so one bad value never changes another row and is still quarantined by validate.
    """
    if transform == "none":
        return features
    if bounds is None:
        values = features.to_numpy(np.float64)
        finite = values[np.isfinite(values)]
        bounds = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    low, high = bounds
    return (low + high) - features


def build_raw_dataset(
    frame: pd.DataFrame,
    params: DataParams,
    feature_range: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """The canonical raw table: feature columns as float, then ``label`` and ``domain``.

    ``feature_range`` (``validate.feature_range``) bounds the demo's target rendering.
    """
    if frame.empty:
        raise DataError(
            f"{params.source}: the file has no rows (columns: {_first_columns(frame)}); "
            "add rows or point data.source at another file"
        )
    if params.label not in frame.columns:
        raise DataError(
            f"data.label: column '{params.label}' not in {params.source} "
            f"(columns: {_first_columns(frame)}); set data.label to the label column"
        )
    if params.text_column is not None:
        return build_text_dataset(frame, params)
    features = resolve_features(frame, params)
    x = pd.DataFrame({c: _numeric(frame[c], c, params.source) for c in features})
    labels = frame[params.label]
    if params.domain_column is not None:
        if params.domain_column not in frame.columns:
            raise DataError(
                f"data.domain_column: column '{params.domain_column}' not in {params.source}"
            )
        domain = domain_text(frame[params.domain_column])
    else:
        domain = assign_domains(
            labels, params.target_fraction, params.seed, params.base_domain, params.target_domain
        )
        is_target = domain == params.target_domain
        rendered = render_target(x, params.target_transform, feature_range)
        x = x.where(~is_target, rendered)
    raw = x.copy()
    raw[LABEL] = labels.to_numpy()
    raw[DOMAIN] = domain.to_numpy()
    return raw.reset_index(drop=True)


def build_text_dataset(frame: pd.DataFrame, params: DataParams) -> pd.DataFrame:
    """The canonical raw table of a text dataset: ``text`` (str, or None when missing; each
    byte that is not UTF-8 and each lone surrogate as U+FFFD), ``label`` (as in the source:
    integers or strings) and ``domain`` (the domain column as text; without one, every row is
    in ``data.base_domain``: one domain)."""
    column = params.text_column
    if column not in frame.columns:
        raise DataError(
            f"data.text_column: column '{column}' not in {params.source} "
            f"(columns: {_first_columns(frame)}); set data.text_column to the text column"
        )
    texts = text_values(frame[column], column, params.source)
    if params.domain_column is not None:
        if params.domain_column not in frame.columns:
            raise DataError(
                f"data.domain_column: column '{params.domain_column}' not in {params.source} "
                f"(columns: {_first_columns(frame)})"
            )
        domain = domain_text(frame[params.domain_column]).to_numpy()
    else:
        domain = np.full(len(frame), params.base_domain, dtype=object)
    raw = pd.DataFrame(
        {TEXT: texts, LABEL: _label_values(frame[params.label]).to_numpy(), DOMAIN: domain}
    )
    return raw.reset_index(drop=True)


def text_values(column: pd.Series, name: str, source: str) -> np.ndarray:
    """A text column as str or None per row; a numeric column or one with no text at all
    stops ingest with one line. Bytes (a Parquet binary column) are decoded as UTF-8 with
    U+FFFD for bad bytes; other values (a JSON number among strings) are written as text."""
    numbers = column.map(lambda v: isinstance(v, (int, float, np.number)) and not pd.isna(v))
    if (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)) or (
        column.notna().any() and numbers[column.notna()].all()
    ):
        raise DataError(
            f"{source}: column '{name}' (data.text_column) holds numbers ({column.dtype}), "
            "not text; set data.text_column to the column holding the text"
        )

    def one(value: object) -> str | None:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            return None
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return clean_code_points(value if isinstance(value, str) else str(value))

    texts = np.array([one(v) for v in column.tolist()], dtype=object)
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(
            f"{source}: every text in column '{name}' (data.text_column) is empty or missing "
            f"({len(texts)} rows); set data.text_column to the column holding the text"
        )
    return texts


def _label_values(labels: pd.Series) -> pd.Series:
    """Labels as the source has them; a mix of strings and numbers (JSON Lines) as strings,
    which Parquet can store and which compare as one kind."""
    present = labels.dropna()
    if labels.dtype == object and len(present):
        kinds = {isinstance(v, str) for v in present}
        if kinds == {True, False}:
            return labels.map(lambda v: None if pd.isna(v) else str(v))
    return labels


def _first_columns(frame: pd.DataFrame, limit: int = 10) -> str:
    names = [str(c) for c in frame.columns[:limit]]
    return f"{names}{'...' if frame.shape[1] > limit else ''}"


def _numeric(column: pd.Series, name: str, source: str) -> pd.Series:
    """A feature column as float64; text that is not a number stops ingest with one line."""
    bad = ~number_like(column)
    if bad.any():
        position = int(np.argmax(bad))
        where = f"line {position + 2}" if source.endswith(".csv") else f"row {position}"
        raise DataError(
            f"{source}: column '{name}' (data.features) is not numeric: {int(bad.sum())} of "
            f"{len(column)} values are not numbers (first: {column.iloc[position]!r} on {where}); "
            "fix those values or remove the column from data.features"
        )
    return pd.to_numeric(column, errors="coerce").astype(np.float64)


def domain_text(column: pd.Series) -> pd.Series:
    """A domain column as text, compared with ``data.base_domain``/``target_domain``.

    Whole numbers read as ``"1"``, not ``"1.0"``, even when a missing value made the column
    float; missing values stay missing (validate quarantines them).
    """
    if pd.api.types.is_float_dtype(column):
        finite = column.dropna()
        if (finite % 1 == 0).all():
            column = column.astype("Int64")
    text = column.astype("string")
    return text.astype(object).where(text.notna(), None)
