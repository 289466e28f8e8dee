"""Errors a user can fix: each one prints as a single line and exits non-zero."""


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
