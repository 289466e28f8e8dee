"""The shared value helpers: rounding for output files, the numeric check, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.core.common.errors import ParamsError, one_line
from stages.core.common.numbers import number_like, rounded
from stages.core.common.params import load_params


def test_rounded_keeps_ints_and_rounds_floats_to_six_places() -> None:
    assert rounded(3) == 3 and type(rounded(3)) is int  # an epoch reads 3, not 3.0
    assert rounded(np.float64(0.1234565001)) == 0.123457
    assert type(rounded(np.float32(0.5))) is float
    assert rounded(np.int64(2)) == 2.0 and type(rounded(np.int64(2))) is float  # as before
    assert json.dumps([rounded(1), rounded(2 / 3), rounded(np.float64(1e-7))]) == (
        "[1, 0.666667, 0.0]"
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.5, np.nan, 3.0], [True, True, True]),
        (["1.5", "seven", None, "3"], [True, False, True, True]),
        ([True, False], [True, True]),
        (pd.array([1, None], dtype="Int64"), [True, True]),
    ],
)
def test_number_like_marks_only_present_values_that_are_not_numbers(values, expected) -> None:
    assert number_like(pd.Series(values)).tolist() == expected


def test_one_line_collapses_every_line_and_bounds_the_length() -> None:
    assert one_line(ValueError("first\n  second\tthird")) == "first second third"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("  ") == ""
    assert one_line("x" * 300, 20) == "x" * 17 + "..."


def test_a_yaml_error_keeps_its_line_and_column(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: not valid YAML: ")
    with pytest.raises(yaml.YAMLError) as raw:
        yaml.safe_load(path.read_text())
    assert "line 4" in str(raw.value) and "line 4" in message  # the second line of PyYAML's text
