"""The pretraining corpus: ``data.corpus`` read, validated like the labelled texts, and kept
apart from the labelled validation and test texts; and ``pretraining_texts``, the one place
the texts for pretraining (and for training a tokenizer) come from.

``data.corpus`` is one of:

- a ``.txt`` file: one document per line (surrounding whitespace stripped; empty lines are
  separators, not documents);
- a folder of ``.txt`` files: one document per file, in sorted path order (hidden files and
  folders skipped);
- a CSV, TSV, Parquet or JSON Lines file: the column ``data.corpus_column`` (default
  ``data.text_column``);
- an ``http(s)://`` URL of such a file, downloaded once into ``.cache/sources`` and checked
  against ``data.corpus_sha256`` (checked for a local file too when set).

The gate quarantines, with a reason each: a missing text (``missing``), an empty or blank one
(``blank``), one with bytes that are not UTF-8 (``invalid_utf8``), one outside
``validate.text_length`` characters (``text_length``), one equal after normalization to a
validation or test text of the labelled splits (``in_val_or_test``: those never go into
pretraining), and a copy of an earlier text after normalization (``duplicate``: the first
stays). No torch or Great Expectations here: the checks are the text gate's own helpers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from stages.core.common import layout
from stages.core.common.data_params import DataParams
from stages.core.common.digests import file_sha256
from stages.core.common.errors import DataError
from stages.core.common.params import Params
from stages.core.common.schema import TEXT
from stages.core.data.sources import TABLE_SUFFIXES, URL_SCHEMES, fetch, read_table
from stages.core.data.text import clean_code_points, first_invalid, is_blank, normalized

# The reasons a corpus text is quarantined, in the order they are checked (a text gets the first).
REASONS = ("missing", "blank", "invalid_utf8", "text_length", "in_val_or_test", "duplicate")


# The labelled splits whose texts never go into pretraining.
HELD_OUT_PARTS = ("val", "test")


@dataclass(frozen=True)
class Corpus:
    """A validated corpus: the clean texts (column ``text``), the quarantined ones (``text``,
    ``reason``) and the report (counts per reason, the md5 of the clean texts)."""

    clean: pd.DataFrame
    rejected: pd.DataFrame
    report: dict


def texts_md5(texts: list[str]) -> str:
    """The md5 of a list of texts (each one's UTF-8 bytes, NUL-separated): equal texts in equal
    order give equal digests, whatever file they were read from."""
    digest = hashlib.md5()
    for i, text in enumerate(texts):
        digest.update((b"\0" if i else b"") + text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _decode(data: bytes) -> str:
    # utf-8-sig: a byte order mark is not text; a byte that is not UTF-8 becomes U+FFFD, which
    # the gate quarantines (as ingest does for the labelled texts).
    return data.decode("utf-8-sig", errors="replace")


def _read_bytes(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read the file ({exc.strerror or exc})") from None


def _lines(path: Path, source: str) -> list[str]:
    lines = (line.strip() for line in _decode(_read_bytes(path, source)).split("\n"))
    return [line for line in lines if line]


def _folder(folder: Path, source: str) -> list[str]:
    files = sorted(
        rel
        for rel in (p.relative_to(folder) for p in folder.rglob("*.txt"))
        if not any(part.startswith(".") for part in rel.parts) and (folder / rel).is_file()
    )
    if not files:
        raise DataError(f"data.corpus: no .txt files in the folder {source}")
    return [
        _decode(_read_bytes(folder / rel, f"{source}/{rel.as_posix()}")).strip() for rel in files
    ]


def _kind(name: str, source: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix == ".txt":
        return "txt"
    if suffix in TABLE_SUFFIXES:
        return TABLE_SUFFIXES[suffix]
    raise DataError(
        f"data.corpus: '{source}': expected a .txt file, a folder of .txt files, or a .csv, "
        ".tsv, .parquet or .jsonl file"
    )


def _column(path: Path, source: str, kind: str, params: DataParams) -> pd.Series:
    table = read_table(path, source, kind, text=True)
    column = params.corpus_column or params.text_column
    if column not in table.columns:
        key = "data.corpus_column" if params.corpus_column else "data.text_column"
        raise DataError(
            f"{key}: column {column!r} is not in the corpus {source} "
            f"(its columns: {list(map(str, table.columns))[:10]})"
        )
    values = [
        None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in table[column]
    ]
    return pd.Series(
        [clean_code_points(str(v)) if v is not None else None for v in values], dtype=object
    )


def read_corpus(params: DataParams, root: Path | str = ".") -> pd.Series:
    """The raw documents of ``data.corpus`` (missing values as None, text as read: bytes that
    are not UTF-8 as U+FFFD), in file order."""
    source = params.corpus
    if source is None:
        raise DataError("data.corpus: not set")
    if source.startswith(URL_SCHEMES):
        kind = _kind(urlparse(source).path, source)
        if params.corpus_sha256 is None:  # params.py requires it; callers may build params
            raise DataError(f"data.corpus_sha256: required for the URL {source}")
        path = fetch(
            source, params.corpus_sha256, Path(root) / layout.SOURCE_CACHE, params.download_timeout
        )
    else:
        path = Path(root) / source
        if path.is_dir():
            if params.corpus_sha256 is not None:
                raise DataError(
                    f"data.corpus_sha256: checks a file or URL, not the folder {source}"
                )
            return pd.Series(_folder(path, source), dtype=object)
        if not path.exists():
            raise DataError(
                f"data.corpus: file not found: {source}; put the file or folder there or fix "
                "data.corpus"
            )
        kind = _kind(path.name, source)
        if params.corpus_sha256 is not None and file_sha256(path) != params.corpus_sha256:
            raise DataError(
                f"{source}: sha256 mismatch: data.corpus_sha256 is {params.corpus_sha256}, the "
                f"file has {file_sha256(path)}; check the file, then update data.corpus_sha256"
            )
    if kind == "txt":
        return pd.Series(_lines(path, source), dtype=object)
    return _column(path, source, kind, params)


def held_out_texts(root: Path | str = ".") -> set[str]:
    """The normalized texts of every validation and test split of the labelled data."""
    found: set[str] = set()
    for path in sorted((Path(root) / layout.SPLITS).glob("*.parquet")):
        if path.stem.rsplit("_", 1)[-1] in HELD_OUT_PARTS:
            found.update(normalized(pd.read_parquet(path, columns=[TEXT])[TEXT]).dropna())
    return found


def validate_corpus(
    texts: pd.Series, text_length: tuple[int, int], held_out: set[str], source: str
) -> Corpus:
    """Quarantine the texts that fail a check (see the module's docstring) and report it;
    an empty corpus after the gate is a DataError."""
    texts = texts.reset_index(drop=True)
    reason = pd.Series(None, index=texts.index, dtype=object)

    def mark(failing: np.ndarray, name: str) -> None:
        reason[np.asarray(failing, dtype=bool) & reason.isna().to_numpy()] = name

    missing = texts.map(lambda v: not isinstance(v, str)).to_numpy()
    mark(missing, "missing")
    mark(is_blank(texts), "blank")
    mark(
        texts.map(lambda v: isinstance(v, str) and first_invalid(v) >= 0).to_numpy(), "invalid_utf8"
    )
    low, high = text_length
    size = texts.map(lambda v: len(v) if isinstance(v, str) else 0).to_numpy()
    mark(~missing & ((size < low) | (size > high)), "text_length")
    norm = normalized(texts)
    mark(norm.isin(held_out).to_numpy() & ~missing, "in_val_or_test")
    alive = reason.isna()
    mark((norm.duplicated(keep="first") & alive).to_numpy(), "duplicate")
    keep = reason.isna().to_numpy()
    clean = pd.DataFrame({TEXT: texts[keep].astype(str).to_numpy()})
    rejected = pd.DataFrame({TEXT: texts[~keep].to_numpy(), "reason": reason[~keep].to_numpy()})
    counts = rejected["reason"].value_counts()
    report = {
        "source": source,
        "rows_in": len(texts),
        "rows_clean": len(clean),
        "rows_quarantined": len(rejected),
        "quarantined": {name: int(counts.get(name, 0)) for name in REASONS},
        "texts_md5": texts_md5(clean[TEXT].tolist()),
    }
    if clean.empty:
        found = ", ".join(f"{k} {v}" for k, v in report["quarantined"].items() if v) or "no rows"
        raise DataError(
            f"data.corpus: no usable text in {source} after validation ({found}); "
            "point data.corpus at a file with text"
        )
    return Corpus(clean, rejected, report)


def build_corpus(params: Params, root: Path | str = ".") -> Corpus:
    """Read and validate ``data.corpus`` against the labelled splits under ``root``."""
    texts = read_corpus(params.data, root)
    return validate_corpus(
        texts, params.validate_.text_length, held_out_texts(root), str(params.data.corpus)
    )


def labelled_train_texts(params: Params, root: Path | str = ".") -> list[str]:
    """The texts of the labelled train splits, labels unused: the base domain's, then the
    target domain's (once for a one-domain dataset, whose target splits mirror the base)."""
    roles = ["base"] if params.data.single_domain else ["base", "target"]
    texts: list[str] = []
    for role in roles:
        path = Path(root) / layout.split_path(role, "train")
        texts += pd.read_parquet(path, columns=[TEXT])[TEXT].astype(str).tolist()
    return texts


def pretraining_texts(params: Params, root: Path | str = ".") -> list[str]:
    """The texts to pretrain on (and to train a tokenizer on): the validated corpus
    (``data/corpus/corpus.parquet``, written by the tokenize stage) when ``data.corpus`` is
    set, else the labelled train splits' texts. Never a validation or test text."""
    if params.data.text_column is None:
        raise DataError(
            "pretraining texts: the data has no text (data.text_column is null); "
            "set data.text_column to a text dataset's column"
        )
    if params.data.corpus is None:
        texts = labelled_train_texts(params, root)
    else:
        path = Path(root) / layout.CORPUS
        if not path.is_file():
            raise DataError(f"{layout.CORPUS}: not found; run the tokenize stage first")
        texts = pd.read_parquet(path, columns=[TEXT])[TEXT].tolist()
    if not texts:
        raise DataError("pretraining texts: none (the corpus or the train splits are empty)")
    return texts
