"""The params of the data stages (``data``, ``validate``, ``split`` in params.yaml), the base of
every section, and the one check of a path param; stages.core.common.params loads them."""

from __future__ import annotations

import posixpath
import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    """A section of params.yaml: unknown keys are refused, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def repo_path(value: str) -> PurePosixPath:
    """``value`` as a path inside the repository, ``..`` resolved (``data/suites/../x.json`` is
    ``data/x.json``); an absolute path or one that climbs out of the repository is refused: DVC
    tracks only files inside the repository, so a change to such a file would never rerun the
    stage that reads it. Every path param goes through this one check."""
    if PurePosixPath(value).is_absolute():
        raise ValueError(
            "must be a path inside the repository, relative to its root: DVC only tracks files "
            "inside the repo, so a change to an absolute path would never rerun the pipeline"
        )
    resolved = PurePosixPath(posixpath.normpath(value))
    if resolved.parts[:1] == ("..",):
        raise ValueError(
            f"climbs out of the repository (resolves to {resolved}): DVC only tracks files "
            "inside the repo, so a change to it would never rerun the pipeline"
        )
    return resolved


class DataParams(Section):
    source: str = "sklearn:digits"
    label: str = "label"
    features: list[str] | None = None
    domain_column: str | None = None
    base_domain: str = "base"
    target_domain: str = "target"
    target_fraction: float = Field(0.5, gt=0, lt=1)
    target_transform: Literal["invert", "none"] = "invert"
    seed: int = 42
    image_mode: Literal["grey", "rgb"] = "grey"
    # [H, W] (grey) or [C, H, W]; the features are the flattened pixels in C, H, W order.
    image_shape: list[int] | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", validate_default=True)
    download_timeout: float = Field(30.0, gt=0)
    # The column holding the text of a text dataset; null: numeric features (or images).
    text_column: str | None = Field(None, min_length=1)
    # Unlabelled pretraining text: a .txt file (a document per line), a folder of .txt files
    # (a document per file), a CSV/TSV/Parquet/JSON Lines file (column corpus_column) or an
    # http(s) URL of one such file (with corpus_sha256); null: the labelled train splits' texts.
    corpus: str | None = Field(None, min_length=1)
    corpus_column: str | None = Field(None, min_length=1)  # null: data.text_column
    corpus_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    def check_corpus(self) -> None:
        """data.corpus: a text dataset's, a path in the repo or an http(s) URL with a sha256."""
        corpus = self.corpus
        if corpus is None:
            return
        if self.text_column is None:
            raise ValueError(
                "data.corpus: pretraining text needs a text dataset (set data.text_column)"
            )
        url = corpus.startswith(("http://", "https://"))
        if url and self.corpus_sha256 is None:
            raise ValueError(
                "data.corpus_sha256: required for an http(s) corpus: set it to the file's "
                "SHA-256 (sha256sum FILE)"
            )
        if not url:
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", corpus):
                raise ValueError(
                    f"data.corpus: unknown scheme in {corpus!r}; use a path in the repository "
                    "or an http(s):// URL with data.corpus_sha256"
                )
            try:
                path = repo_path(corpus)
            except ValueError as exc:
                raise ValueError(f"data.corpus: {exc}") from None
            # The tokenize stage depends on data/source/: a corpus elsewhere would not rerun it.
            if path.parts[:2] != ("data", "source") or len(path.parts) < 3:
                raise ValueError(
                    f"data.corpus: {corpus!r} must be under data/source/ (the tokenize stage's "
                    "DVC deps hold data/source/, so a corpus elsewhere would never rerun it)"
                )

    @model_validator(mode="after")
    def _distinct_domains(self) -> DataParams:
        if self.base_domain == self.target_domain:
            raise ValueError("base_domain and target_domain must differ")
        return self

    @field_validator("source")
    @classmethod
    def _local_source_inside_the_repo(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value):  # sklearn:, https://: no path
            repo_path(value)
        return value

    @property
    def single_domain(self) -> bool:
        """A text dataset without a domain column is one domain: every row is in
        ``base_domain``, and the split stage gives the target role that domain's splits."""
        return self.text_column is not None and self.domain_column is None

    def domains(self) -> list[str]:
        """The domain values the data holds: base and target, or the base alone for a
        single-domain text dataset."""
        if self.single_domain:
            return [self.base_domain]
        return [self.base_domain, self.target_domain]

    @field_validator("sha256")
    @classmethod
    def _checksum_for_urls(cls, value: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source", "")
        if value is None and source.startswith(("http://", "https://")):
            raise ValueError(
                "required for an http(s) source: set it to the file's SHA-256 (sha256sum FILE)"
            )
        if value is not None and source.startswith("sklearn:"):
            raise ValueError("checks a file or URL source; set it to null for sklearn: sources")
        return value

    @field_validator("image_shape")
    @classmethod
    def _image_shape(cls, shape: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if shape is None:
            return shape
        if len(shape) not in (2, 3) or any(size < 1 for size in shape):
            raise ValueError("must be [H, W] or [C, H, W] of positive sizes")
        channels = shape[0] if len(shape) == 3 else 1
        if channels != (3 if info.data.get("image_mode") == "rgb" else 1):
            raise ValueError("must be [3, H, W] for image_mode rgb, [H, W] or [1, H, W] for grey")
        return shape


class ValidateParams(Section):
    feature_range: tuple[float, float] | None = (0, 16)
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    min_rows_per_class: int = Field(5, ge=1)
    suite: str | None = None
    # Text datasets: a text shorter or longer than this, in characters, is quarantined.
    text_length: tuple[int, int] = (1, 20000)

    @field_validator("text_length")
    @classmethod
    def _text_length(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[0] > value[1]:
            raise ValueError("must be [min, max] characters with 0 <= min <= max")
        return value

    @field_validator("suite")
    @classmethod
    def _suite_under_data_suites(cls, value: str | None) -> str | None:
        # validate depends on data/suites/ in dvc.yaml: a suite elsewhere would not rerun it.
        path = repo_path(value) if value is not None else None
        if path is not None and (path.parts[:2] != ("data", "suites") or path.suffix != ".json"):
            raise ValueError(
                "must be a .json file under data/suites/ (e.g. data/suites/raw.json): validate's "
                "DVC deps hold data/suites/, so a suite elsewhere would never rerun it"
                + (f" (it resolves to {path})" if path.as_posix() != value else "")
            )
        return value

    @field_validator("feature_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError("feature_range must be [low, high] with low <= high")
        return value


class SplitParams(Section):
    seed: int = 42
    test_size: float = Field(0.2, gt=0, lt=1)
    val_size: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitParams:
        if self.test_size + self.val_size >= 1:
            raise ValueError("test_size + val_size must leave rows for training (< 1)")
        return self
