"""Errors a user can fix: each one prints as a single line and exits non-zero."""

import re


class PipelineError(Exception):
    """A problem with the user's params or data, reported as one line without a traceback."""


class ParamsError(PipelineError):
    """A key in params.yaml is unknown, of the wrong type or impossible."""


class DataError(PipelineError):
    """The input data cannot be used as it is (missing column, too few rows, bad values)."""


class GateError(PipelineError):
    """A quality gate failed (quarantine share, accuracy, transfer gain)."""


class TrackingError(PipelineError):
    """The tracking store or server cannot record the run (down, unreachable, refused)."""


class ModelError(PipelineError):
    """A saved model is missing, unreadable or does not match its config."""


class TrainingError(PipelineError):
    """Training cannot give a usable model (for example, the loss is NaN from the start)."""


def one_line(exc: BaseException | str, limit: int = 240) -> str:
    """``exc``'s message (or a message of a library's, as text) on one line: every line of it
    with whitespace runs collapsed, at most ``limit`` characters; an exception's type name when
    it has no message. The one way an error from a library is quoted in a message of ours:
    later lines often hold what the first one lacks (a YAML error's line and column, a
    state dict's missing keys)."""
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")


def redact(text: str) -> str:
    """``text`` with the user-info part of every URI in it replaced by ``***``, so that a token
    in ``MLFLOW_TRACKING_URI`` (``https://user:token@host``) never reaches a log:
    ``https://***@host``. Text without such a part comes back unchanged."""
    return _USER_INFO.sub(r"\g<scheme>***@", text)
