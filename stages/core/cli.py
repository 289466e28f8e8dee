"""How every stage starts and fails: one clear line and a non-zero exit for user errors."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from stages.core.errors import PipelineError


def run_stage(name: str, main: Callable[[], None], argv: Sequence[str] = ()) -> None:
    """Run a stage's ``main``; a PipelineError prints ``<name>: error: ...`` and exits 1.

    An error of several lines (several failed gates) prints each with that prefix. With
    ``--verbose`` in ``argv`` (the command line), the traceback comes first.
    """
    try:
        main()
    except PipelineError as exc:
        if "--verbose" in argv:
            traceback.print_exc()
        for line in str(exc).splitlines() or [""]:
            print(f"{name}: error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
