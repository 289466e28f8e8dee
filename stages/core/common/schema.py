"""The canonical table's reserved column names, shared by every stage."""

from __future__ import annotations

LABEL = "label"


DOMAIN = "domain"


RESERVED = (LABEL, DOMAIN)
