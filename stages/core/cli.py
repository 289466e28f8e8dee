"""How every stage starts and fails: one clear line and a non-zero exit for user errors."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from stages.core.errors import PipelineError


def run_stage(name: str, main: Callable[[], None], argv: Sequence[str] = ()) -> None:
    """Run a stage's ``main``; a PipelineError prints ``<name>: error: ...`` and exits 1.

    With ``--verbose`` in ``argv`` (the command line), the traceback comes first.
    """
    try:
        main()
    except PipelineError as exc:
        if "--verbose" in argv:
            traceback.print_exc()
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
