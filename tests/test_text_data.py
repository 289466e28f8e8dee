"""The data side of text datasets: params, text ingest from CSV/TSV/Parquet/JSON Lines, the
text gate (real GX), leakage and drift of texts. Every text is generated in the test."""

from __future__ import annotations

import pytest

from stages.core.common.errors import ParamsError
from stages.core.common.params import parse_params


def _params_error(raw: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_text_params_default_to_the_numeric_path() -> None:
    params = parse_params({})
    assert params.data.text_column is None
    assert params.data.single_domain is False
    assert params.data.domains() == ["base", "target"]
    assert params.validate_.text_length == (1, 20000)
    assert params.finetune.shots_per_class == 5


def test_a_text_dataset_without_a_domain_column_is_one_domain() -> None:
    params = parse_params({"data": {"text_column": "review", "base_domain": "all"}})
    assert params.data.single_domain is True
    assert params.data.domains() == ["all"]
    two = parse_params({"data": {"text_column": "review", "domain_column": "site"}})
    assert two.data.single_domain is False
    assert two.data.domains() == ["base", "target"]


def test_shots_per_class_may_be_null() -> None:
    assert parse_params({"finetune": {"shots_per_class": None}}).finetune.shots_per_class is None
    assert "finetune.shots_per_class" in _params_error({"finetune": {"shots_per_class": 0}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"data": {"text_column": "t", "image_shape": [8, 8]}},
            "params.yaml: data.image_shape: applies to images; set it to null",
        ),
        (
            {"data": {"text_column": "t", "features": ["a"]}},
            "params.yaml: data.features: applies to numeric data; set it to null",
        ),
        ({"data": {"text_column": ""}}, "params.yaml: data.text_column: String should have"),
        ({"validate": {"text_length": [5, 2]}}, "params.yaml: validate.text_length: must be"),
        ({"validate": {"text_length": [-1, 2]}}, "params.yaml: validate.text_length: must be"),
        ({"validate": {"text_length": "long"}}, "params.yaml: validate.text_length: "),
    ],
)
def test_bad_text_params_are_one_line_naming_the_key(raw: dict, expected: str) -> None:
    assert _params_error(raw).startswith(expected)
