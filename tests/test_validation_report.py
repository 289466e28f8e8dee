"""The offline HTML validation report: what it shows, escaped, and nothing that changes."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from conftest import DOMAINS, FEATURES, make_raw_frame

from stages.core.common.data_params import ValidateParams
from stages.core.data.expectations import gate
from stages.core.data.validation_report import render_validation_html

LENIENT = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=1)


def _dirty() -> pd.DataFrame:
    frame = make_raw_frame()
    frame.loc[[1, 2, 3], "f0"] = [np.nan, 99.0, -np.inf]
    frame.loc[4, "domain"] = "<script>alert(1)</script>"
    frame.loc[6] = frame.loc[5]
    return frame


def _page(frame: pd.DataFrame, sample_rows: int = 20) -> tuple[str, dict]:
    result = gate(frame, FEATURES, LENIENT, DOMAINS)
    page = render_validation_html(
        result.report, result.expectations, result.rejected, "built from params", sample_rows
    )
    return page, result.report


def test_report_shows_counts_checks_and_rejected_rows_with_reasons() -> None:
    page, report = _page(_dirty())
    assert report["rows_quarantined"] == 5
    assert '<td class="n">72</td><td class="n">67</td><td class="n">5</td>' in page
    for reason in (
        "f0 is missing",
        "f0 = 99 outside [0, 16]",
        "f0 is -inf",
        "duplicate of row 5",
    ):
        assert f"<td>{reason}</td>" in page
    assert "expect_multicolumn_values_to_be_between" in page
    assert "quarantines rows" in page and "stops the stage" in page
    assert "data/quarantine/rejected.parquet" in page
    assert 'Gate <span class="pass">passed</span>' in page


def test_values_are_escaped() -> None:
    page, _ = _page(_dirty())
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_sample_is_limited_and_says_so() -> None:
    page, _ = _page(_dirty(), sample_rows=2)
    assert "The first 2 of 5" in page
    assert page.count("<td>f0") == 2


def test_a_failed_gate_lists_its_failures() -> None:
    frame = _dirty()
    result = gate(frame, FEATURES, ValidateParams(max_quarantine_fraction=0.01), DOMAINS)
    page = render_validation_html(result.report, result.expectations, result.rejected, "x")
    assert 'Gate <span class="fail">failed</span>' in page
    assert "<li>validate.max_quarantine_fraction: 5 of 72 rows (6.9%)" in page


def test_self_contained_and_byte_stable() -> None:
    page, _ = _page(_dirty())
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}", page)
    again, _ = _page(_dirty())
    assert again == page
