"""The data side of text datasets: params, text ingest from CSV/TSV/Parquet/JSON Lines, the
text gate (real GX), leakage and drift of texts. Every text is generated in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.common.errors import DataError, ParamsError
from stages.core.common.io import write_parquet
from stages.core.common.params import DataParams, parse_params
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.data.ingest import build_raw_dataset, skipped_columns
from stages.core.data.sources import load_source

REVIEWS = pd.DataFrame(
    {
        "review": [
            "Great drug, no side effects",
            'It said "take twice daily"\tand I did',
            "NA",
            "Ça marche très bien 👍",
        ],
        "rating": ["positive", "neutral", "negative", "positive"],
        "site": ["A", "A", "B", "B"],
        "stars": [9, 5, 1, 10],
    }
)


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


def _text_params(source: str, **overrides) -> DataParams:
    return DataParams(**{"source": source, "label": "rating", "text_column": "review", **overrides})


def _ingest(tmp_path: Path, name: str, content: bytes | pd.DataFrame, **overrides):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".parquet"):
        write_parquet(path, content)
    elif name.endswith(".tsv"):
        content.to_csv(path, sep="\t", index=False)
    elif name.endswith(".jsonl"):
        content.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        content.to_csv(path, index=False)
    params = _text_params(name, **overrides)
    source = load_source(params, tmp_path)
    return build_raw_dataset(source, params), source, params


def _ingest_error(tmp_path: Path, name: str, content, **overrides) -> str:
    with pytest.raises(DataError) as caught:
        _ingest(tmp_path, name, content, **overrides)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", ["reviews.csv", "reviews.tsv", "reviews.parquet", "reviews.jsonl"])
def test_every_text_format_round_trips_to_the_canonical_table(tmp_path: Path, name: str) -> None:
    raw, source, params = _ingest(tmp_path, name, REVIEWS, domain_column="site")
    assert list(raw.columns) == [TEXT, LABEL, DOMAIN]
    # Quotes, tabs, emoji and a text reading "NA" come back exactly as written.
    assert raw[TEXT].tolist() == REVIEWS["review"].tolist()
    assert raw[LABEL].tolist() == ["positive", "neutral", "negative", "positive"]
    assert raw[DOMAIN].tolist() == ["A", "A", "B", "B"]
    assert skipped_columns(source, params) == ["stars"]
    written = tmp_path / "raw.parquet"
    write_parquet(written, raw)
    assert pd.read_parquet(written).equals(raw)


def test_without_a_domain_column_every_row_is_in_the_base_domain(tmp_path: Path) -> None:
    raw, _, _ = _ingest(tmp_path, "reviews.csv", REVIEWS, base_domain="reviews")
    assert raw[DOMAIN].tolist() == ["reviews"] * 4


def test_integer_labels_stay_integers_and_mixed_labels_become_strings(tmp_path: Path) -> None:
    ints = REVIEWS.assign(rating=[2, 1, 0, 2])
    raw, _, _ = _ingest(tmp_path, "ints.jsonl", ints)
    assert raw[LABEL].tolist() == [2, 1, 0, 2] and raw[LABEL].dtype == np.int64
    lines = [{"review": "good", "rating": 1}, {"review": "bad", "rating": "neg"}]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    raw, _, _ = _ingest(tmp_path, "mixed.jsonl", content)
    assert raw[LABEL].tolist() == ["1", "neg"]


def test_bytes_that_are_not_utf8_are_kept_as_replacement_characters(tmp_path: Path) -> None:
    csv = b"review,rating\ncaf\xe9 is good,pos\nfine,pos\n\xff\xfe,neg\n"
    raw, _, _ = _ingest(tmp_path, "latin1.csv", csv)
    assert raw[TEXT].tolist() == ["caf\ufffd is good", "fine", "\ufffd\ufffd"]
    tsv = b"review\trating\nok\tpos\nbad \xc3( byte\tneg\n"
    raw, _, _ = _ingest(tmp_path, "bad.tsv", tsv)
    assert raw[TEXT].tolist() == ["ok", "bad \ufffd( byte"]
    jsonl = b'{"review": "ok", "rating": 1}\n{"review": "caf\xe9", "rating": 0}\n'
    raw, _, _ = _ingest(tmp_path, "bad.jsonl", jsonl)
    assert raw[TEXT].tolist() == ["ok", "caf\ufffd"]


def test_lone_surrogates_and_binary_parquet_columns_are_kept(tmp_path: Path) -> None:
    # A JSON escape of a lone surrogate is valid JSON but no Unicode text.
    jsonl = b'{"review": "half \\ud800 pair", "rating": 1}\n{"review": "ok", "rating": 0}\n'
    raw, _, _ = _ingest(tmp_path, "surrogate.jsonl", jsonl)
    assert raw[TEXT].tolist() == ["half \ufffd pair", "ok"]
    table = pa.table(
        {"review": pa.array([b"ok", b"caf\xe9", None], pa.binary()), "rating": [1, 0, 1]}
    )
    pq.write_table(table, tmp_path / "binary.parquet")
    params = _text_params("binary.parquet")
    raw = build_raw_dataset(load_source(params, tmp_path), params)
    assert raw[TEXT].tolist()[:2] == ["ok", "caf\ufffd"] and pd.isna(raw[TEXT][2])
    write_parquet(tmp_path / "raw.parquet", raw)  # Parquet takes it: no surrogate left


def test_text_bad_input_is_one_line(tmp_path: Path) -> None:
    message = _ingest_error(tmp_path, "a.csv", REVIEWS, text_column="body")
    assert message.startswith("data.text_column: column 'body' not in a.csv (columns: ['review'")
    message = _ingest_error(tmp_path, "b.csv", REVIEWS, text_column="stars")
    assert message.startswith("b.csv: column 'stars' (data.text_column) holds numbers (int64)")
    numbers = b'{"review": 1, "rating": 1}\n{"review": 2.5, "rating": 0}\n'
    assert "holds numbers" in _ingest_error(tmp_path, "c.jsonl", numbers)
    empty = REVIEWS.assign(review=["", "  ", None, "\t"])
    message = _ingest_error(tmp_path, "d.parquet", empty)
    assert message.startswith("d.parquet: every text in column 'review' (data.text_column) is")
    message = _ingest_error(tmp_path, "e.jsonl", b'{"review": "x", "rating": 1}\n[1, 2]\n')
    assert message.startswith("e.jsonl: line 2 is a JSON list, not an object")
    message = _ingest_error(tmp_path, "f.jsonl", b'{"review": "x", "rating": 1}\n{"review": \n')
    assert message.startswith("f.jsonl: line 2 is not valid JSON")
    message = _ingest_error(tmp_path, "g.csv", REVIEWS, domain_column="hospital")
    assert message.startswith("data.domain_column: column 'hospital' not in g.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"^data.text_column: folder is a folder"):
        load_source(_text_params("folder"), tmp_path)


def test_numeric_sources_still_refuse_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_bytes(b'{"a": 1, "label": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^x.jsonl: not UTF-8 text \(byte 0xe9 on line 1\)"):
        load_source(DataParams(source="x.jsonl"), tmp_path)
    (tmp_path / "x.tsv").write_bytes(b"a\tlabel\n1\tcaf\xe9\n")
    with pytest.raises(DataError, match=r"^x.tsv: not UTF-8 text"):
        load_source(DataParams(source="x.tsv"), tmp_path)
