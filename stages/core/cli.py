"""How every stage starts and fails: one clear line and a non-zero exit for user errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

from stages.core.errors import PipelineError


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a PipelineError prints ``<name>: error: ...`` and exits 1.

    An error of several lines (several failed gates) prints each with that prefix.
    """
    try:
        main()
    except PipelineError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"{name}: error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
