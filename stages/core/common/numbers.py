"""Small value helpers shared by every concern."""

from __future__ import annotations

from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages read ``class 1``."""
    return value.item() if isinstance(value, np.generic) else value
