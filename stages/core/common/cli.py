"""How every stage starts and fails: one clear line and a non-zero exit for user errors."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from stages.core.common.errors import PipelineError, redact


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
        # A URI in a param or the environment may carry credentials: never print them.
        for line in redact(str(exc)).splitlines() or [""]:
            print(f"{name}: error: {line}", file=sys.stderr)
        raise SystemExit(1) from None


def run_as_script(name: str, main: Callable[[], None]) -> None:
    """``python -m stages.<name>``: ``run_stage`` with the command line, then end the process at
    once. Every output is written and closed by then; what is left, the interpreter's teardown
    of torch, pandas and their threads, takes about a second that DVC would wait for."""
    code = 0
    try:
        run_stage(name, main, sys.argv[1:])
    except SystemExit as exc:  # as the interpreter would: None is 0, a message is printed, 1
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
