"""Text helpers shared by ingest, the text gate, the split's leakage check and drift.

No Great Expectations or torch here: the split stage imports it."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

# What ingest puts for each byte that is not UTF-8 and each lone surrogate (a JSON "\ud800"):
# the Unicode replacement character. Parquet holds only valid UTF-8, so the raw table cannot
# keep the bad code units themselves; the text gate quarantines every text holding U+FFFD.
REPLACEMENT = "\ufffd"


_SURROGATE = re.compile("[\ud800-\udfff]")


_INVALID = re.compile("[\ufffd\ud800-\udfff]")


_WHITESPACE = re.compile(r"\s+")


_WORD = re.compile(r"\w+")


def clean_code_points(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (strings decoded from bytes with
    ``errors="replace"`` already hold U+FFFD for each bad byte)."""
    return _SURROGATE.sub(REPLACEMENT, text)


def first_invalid(text: str) -> int:
    """The position of the first U+FFFD or lone surrogate in ``text``, else -1."""
    found = _INVALID.search(text)
    return found.start() if found else -1


def normalize(text: str) -> str:
    """The form texts are compared in: whitespace runs as one space, stripped, case-folded."""
    return _WHITESPACE.sub(" ", text).strip().casefold()


def normalized(texts: pd.Series) -> pd.Series:
    """``normalize`` of each text; missing texts stay missing."""
    return texts.map(lambda value: normalize(value) if isinstance(value, str) else None)


def is_blank(texts: pd.Series) -> np.ndarray:
    """Per text: empty or only whitespace (missing texts are the null check's business)."""
    return np.fromiter(
        (isinstance(v, str) and not v.strip() for v in texts), dtype=bool, count=len(texts)
    )


def lengths(texts: pd.Series) -> np.ndarray:
    """Each text's length in characters (Unicode code points) as float64."""
    return texts.map(len).to_numpy(np.float64)


def tokens(text: str) -> list[str]:
    """The lower-cased word tokens (runs of letters, digits and underscores) of ``text``."""
    return _WORD.findall(text.lower())
