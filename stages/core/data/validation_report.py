"""The validation report as one self-contained HTML page: no scripts, no external styles or
links, no timestamps, so that it reads offline and the same run gives the same bytes.

(GX's Data Docs load their styles from the internet and embed run times: not a DVC output.)"""

from __future__ import annotations

from html import escape
from typing import Any

import pandas as pd

from stages.core.common.layout import REJECTED
from stages.core.common.numbers import plain
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.data.expectations import RAW_ROW, REASON

SAMPLE_ROWS = 20


TEXT_CHARS = 80  # a rejected text is shown up to this many characters


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 70rem; }
h1 { margin-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f2f2f2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #11663a; font-weight: bold; }
.fail { color: #a11; font-weight: bold; }
code { background: #f5f5f5; padding: 0 0.2rem; }
"""


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{escape(str(v))}</td>' if i in numeric else f"<td>{escape(str(v))}</td>"
            for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _verdict(ok: bool, yes: str = "passed", no: str = "failed") -> str:
    return f'<span class="{"pass" if ok else "fail"}">{yes if ok else no}</span>'


def render_validation_html(
    report: dict,
    expectations: list[dict],
    rejected: pd.DataFrame,
    suite_source: str,
    sample_rows: int = SAMPLE_ROWS,
) -> str:
    """The page: verdict and gate failures, row counts, each expectation's result, the rows
    failing each check, and the first ``sample_rows`` rejected rows with their reasons."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        "<title>Validation report</title>\n",
        f"<style>{_STYLE}</style>\n</head>\n<body>\n",
        "<h1>Validation report</h1>\n",
        f"<p>Gate {_verdict(report['passed'])}. Suite: <code>{escape(suite_source)}</code>.</p>\n",
    ]
    if report["failures"]:
        items = "".join(f"<li>{escape(f)}</li>" for f in report["failures"])
        parts.append(f"<ul>{items}</ul>\n")
    parts.append("<h2>Rows</h2>\n")
    parts.append(
        _table(
            ["rows in", "clean", "quarantined", "quarantined share"],
            [
                [
                    report["rows_in"],
                    report["rows_clean"],
                    report["rows_quarantined"],
                    f"{report['quarantine_fraction']:.2%}",
                ]
            ],
            numeric={0, 1, 2, 3},
        )
    )
    parts.append("<h2>Expectations</h2>\n")
    parts.append(
        _table(
            ["expectation", "columns", "level", "result", "failing rows"],
            [
                [
                    e["type"],
                    e["column"],
                    "stops the stage" if e["level"] == "table" else "quarantines rows",
                    "passed" if e["success"] else "failed",
                    e["failing_rows"],
                ]
                for e in expectations
            ],
            numeric={4},
        )
    )
    parts.append("<h2>Rows failing each check</h2>\n<p>A row can fail several checks.</p>\n")
    parts.append(
        _table(["check", "rows"], [[k, v] for k, v in report["checks"].items()], numeric={1})
    )
    shown = rejected.head(sample_rows)
    parts.append(
        f"<h2>Rejected rows</h2>\n<p>The first {len(shown)} of {len(rejected)}, with their "
        f"reasons; every rejected row, with all its columns: <code>{REJECTED}</code>. "
        f"<code>{RAW_ROW}</code> is the row's position in the raw table.</p>\n"
    )
    if len(shown) and TEXT in shown.columns:
        parts.append(
            _table(
                [RAW_ROW, TEXT, LABEL, DOMAIN, REASON],
                [
                    [
                        row[RAW_ROW],
                        _short(row[TEXT]),
                        _text(row[LABEL]),
                        _text(row[DOMAIN]),
                        row[REASON],
                    ]
                    for row in shown.to_dict("records")
                ],
                numeric={0},
            )
        )
    elif len(shown):
        parts.append(
            _table(
                [RAW_ROW, LABEL, DOMAIN, REASON],
                [
                    [
                        row[RAW_ROW],
                        _text(row[LABEL]),
                        _text(row[DOMAIN]),
                        row[REASON],
                    ]
                    for row in shown.to_dict("records")
                ],
                numeric={0},
            )
        )
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _text(value: Any) -> str:
    return "(missing)" if pd.isna(value) else str(plain(value))


def _short(text: Any, limit: int = TEXT_CHARS) -> str:
    """A text on one line (whitespace runs as one space), cut to ``limit`` characters."""
    if not isinstance(text, str):
        return "(missing)"
    line = " ".join(text.split())
    if not line:
        return "(blank)"
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"
