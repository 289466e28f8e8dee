"""The canonical table's reserved column names, shared by every stage."""

from __future__ import annotations

LABEL = "label"


DOMAIN = "domain"


# A text dataset's text column (data.text_column renamed): its raw, clean and split tables are
# text, label, domain. Not in RESERVED, which names the non-feature columns of numeric tables.
TEXT = "text"


RESERVED = (LABEL, DOMAIN)
