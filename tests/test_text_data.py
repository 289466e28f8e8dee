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
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.common.data_params import DataParams, SplitParams, ValidateParams
from stages.core.common.errors import DataError, ParamsError
from stages.core.common.io import write_parquet
from stages.core.common.params import parse_params
from stages.core.common.schema import DOMAIN, LABEL, TEXT
from stages.core.data.drift import most_shifted, text_drift_report
from stages.core.data.expectations import gate
from stages.core.data.ingest import build_raw_dataset, skipped_columns
from stages.core.data.sources import load_source
from stages.core.data.splitting import (
    PARTS,
    check_text_leakage,
    mirror_single_domain,
    split_domains,
)
from stages.core.data.suites import infer_text_suite, load_suite, suite_json, text_params_suite

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
        (
            {"data": {"text_column": "label", "image_shape": None}},
            "params.yaml: data.text_column: 'label' is also data.label or data.domain_column",
        ),
        (
            {"model": {"arch": "hf", "pretrained": "m", "dropout": 0.2}},
            "params.yaml: model.dropout: 0.2 applies to mlp, cnn and transformer; arch hf keeps",
        ),
        ({"validate": {"text_length": [5, 2]}}, "params.yaml: validate.text_length: must be"),
        ({"validate": {"text_length": [-1, 2]}}, "params.yaml: validate.text_length: must be"),
        ({"validate": {"text_length": "long"}}, "params.yaml: validate.text_length: "),
    ],
)
def test_bad_text_params_are_one_line_naming_the_key(raw: dict, expected: str) -> None:
    assert _params_error(raw).startswith(expected)


def test_dropout_stays_for_the_archs_that_use_it() -> None:
    assert parse_params({"model": {"arch": "mlp", "dropout": 0.2}}).model.dropout == 0.2
    hf = parse_params({"model": {"arch": "hf", "pretrained": "m", "dropout": 0.0}})
    assert hf.model.dropout == 0.0


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
    raw, _, _ = _ingest(tmp_path, "mixed.jsonl", b"\xef\xbb\xbf" + content)  # with a BOM
    assert raw[LABEL].tolist() == ["1", "neg"]
    assert raw[TEXT].tolist() == ["good", "bad"]


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


# --- the text gate ------------------------------------------------------------------------

TEXT_LENIENT = ValidateParams(max_quarantine_fraction=1.0, min_rows_per_class=1)


def make_text_frame(rows_per_pair: int = 12, seed: int = 0) -> pd.DataFrame:
    """Distinct texts, two classes learnable from words, in two domains."""
    rng = np.random.default_rng(seed)
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    rows = []
    for domain in ("base", "target"):
        for label, vocab in words.items():
            for i in range(rows_per_pair):
                body = " ".join(rng.choice(vocab, size=3))
                rows.append({TEXT: f"{domain} review {i}: {body}", LABEL: label, DOMAIN: domain})
    return pd.DataFrame(rows)


def _text_gate(frame: pd.DataFrame, params: ValidateParams = TEXT_LENIENT, **kwargs):
    return gate(frame, [], params, ["base", "target"], text=True, **kwargs)


def test_a_clean_text_table_passes_the_text_gate() -> None:
    frame = make_text_frame()
    result = _text_gate(frame, ValidateParams())
    assert result.report["rows_clean"] == len(frame) and result.report["rows_quarantined"] == 0
    assert result.report["passed"] is True
    assert list(result.report["checks"]) == [
        "missing_columns",
        "not_null",
        "blank_text",
        "invalid_utf8",
        "text_length",
        "known_domain",
        "duplicate",
        "conflicting_label",
        "short_classes",
    ]
    assert result.clean.equals(frame)


def test_the_text_gate_quarantines_each_bad_text_with_every_reason() -> None:
    frame = make_text_frame()
    n = len(frame)
    bad = pd.DataFrame(
        [
            {TEXT: None, LABEL: "pos", DOMAIN: "base"},
            {TEXT: "   \t ", LABEL: "pos", DOMAIN: "base"},
            {TEXT: "caf\ufffd is good", LABEL: "pos", DOMAIN: "base"},
            {TEXT: "x" * 41, LABEL: "neg", DOMAIN: "target"},
            {
                TEXT: "  BASE review 0:   " + frame.loc[0, TEXT].split(": ")[1].upper(),
                LABEL: "pos",
                DOMAIN: "base",
            },
            {TEXT: "Same words here", LABEL: "pos", DOMAIN: "base"},
            {TEXT: "same   WORDS here ", LABEL: "neg", DOMAIN: "target"},
            {TEXT: "", LABEL: None, DOMAIN: "elsewhere"},
        ]
    )
    raw = pd.concat([frame, bad], ignore_index=True)
    result = _text_gate(
        raw, ValidateParams(text_length=(1, 40), max_quarantine_fraction=1.0, min_rows_per_class=1)
    )
    report = result.report
    assert report["rows_in"] == report["rows_clean"] + report["rows_quarantined"] == n + 8
    reasons = dict(zip(result.rejected["raw_row"], result.rejected["reason"], strict=True))
    assert reasons == {
        n: "text is missing",
        n + 1: "text is blank",
        n + 2: "text is not valid UTF-8 (U+FFFD or a lone surrogate at character 3)",
        n + 3: "text has 41 characters, outside [1, 40]",
        n + 4: "text (normalized) duplicate of row 0",
        n + 5: f"text (normalized) equal to row {n + 6} with another label",
        n + 6: f"text (normalized) equal to row {n + 5} with another label",
        n + 7: "text is blank; text has 0 characters, outside [1, 40]; label is missing; "
        "domain 'elsewhere' not in ['base', 'target']",
    }
    assert report["checks"] | {"short_classes": 0} == {
        "missing_columns": 0,
        "not_null": 2,
        "blank_text": 2,
        "invalid_utf8": 1,
        "text_length": 2,
        "known_domain": 1,
        "duplicate": 1,
        "conflicting_label": 2,
        "short_classes": 0,
    }
    # The first copy stays; a quarantined row keeps its text as it was.
    assert 0 in set(range(n)) - set(reasons) and frame.loc[0, TEXT] in result.clean[TEXT].tolist()
    assert (
        result.rejected.loc[result.rejected["raw_row"] == n + 2, TEXT].item() == "caf\ufffd is good"
    )
    assert list(result.rejected.columns) == [TEXT, LABEL, DOMAIN, "reason", "raw_row"]


def test_invalid_utf8_bytes_reach_the_quarantine_through_ingest(tmp_path: Path) -> None:
    lines = [f"review {i} is fine,pos".encode() for i in range(6)]
    lines += [f"review {i} is bad,neg".encode() for i in range(6)]
    lines.insert(3, b"caf\xe9 au lait,pos")
    (tmp_path / "reviews.csv").write_bytes(b"review,rating\n" + b"\n".join(lines) + b"\n")
    params = _text_params("reviews.csv")
    raw = build_raw_dataset(load_source(params, tmp_path), params)
    write_parquet(tmp_path / "raw.parquet", raw)
    raw = pd.read_parquet(tmp_path / "raw.parquet")
    result = gate(raw, [], TEXT_LENIENT, params.domains(), text=True)
    assert result.rejected["raw_row"].tolist() == [3]
    assert result.rejected["reason"].item().startswith("text is not valid UTF-8")
    assert result.report["rows_clean"] == 12 and result.report["passed"] is True


def test_a_one_domain_text_dataset_is_gated_on_its_one_domain() -> None:
    frame = make_text_frame()
    frame = frame[frame[DOMAIN] == "base"]
    result = gate(frame, [], ValidateParams(min_rows_per_class=5), ["base"], text=True)
    assert result.report["passed"] is True
    # Gated on base and target instead, every class of the empty target domain would be short.
    two = gate(frame, [], ValidateParams(min_rows_per_class=5), ["base", "target"], text=True)
    assert two.report["checks"]["short_classes"] == 2


def test_the_text_suite_round_trips_and_an_inferred_one_pins_lengths_and_classes(
    tmp_path: Path,
) -> None:
    frame = make_text_frame()
    suite = text_params_suite(ValidateParams(text_length=(2, 50)), ["base", "target"])
    path = tmp_path / "text.json"
    path.write_text(suite_json(suite))
    assert load_suite(path) == suite
    inferred = infer_text_suite(frame, ["base", "target"])
    by_type = {item["type"]: item["kwargs"] for item in inferred}
    sizes = frame[TEXT].map(len)
    assert by_type["expect_column_value_lengths_to_be_between"] == {
        "column": TEXT,
        "min_value": int(sizes.min()),
        "max_value": int(sizes.max()),
    }
    labels = [
        k
        for item in inferred
        if item["type"] == "expect_column_values_to_be_in_set"
        for k in [item["kwargs"]]
        if k["column"] == LABEL
    ]
    assert labels == [{"column": LABEL, "value_set": ["neg", "pos"]}]
    unseen = pd.concat(
        [
            frame,
            pd.DataFrame([{TEXT: "base review 99: a new class", LABEL: "meh", DOMAIN: "base"}]),
        ],
        ignore_index=True,
    )
    result = _text_gate(unseen, suite=inferred)
    assert result.rejected["reason"].tolist() == ["label 'meh' not in ['neg', 'pos']"]


def test_a_text_table_without_its_text_column_stops_the_gate() -> None:
    frame = make_text_frame().drop(columns=[TEXT])
    with pytest.raises(DataError, match=r"missing columns \['text'\] \(text, label, domain\)"):
        _text_gate(frame)


# --- split and drift ----------------------------------------------------------------------


def test_text_leakage_finds_a_normalized_text_in_two_parts() -> None:
    frame = make_text_frame()
    splits = split_domains(frame, SplitParams(), {"base": "base", "target": "target"})
    check_text_leakage(splits, {"base": "base", "target": "target"})  # distinct texts: passes
    leaked = splits["target_test"].copy()
    leaked.loc[0, TEXT] = "  " + splits["base_train"].loc[0, TEXT].upper().replace(" ", "\t")
    with pytest.raises(
        DataError,
        match=r"^split: 1 texts \(normalized\) are in both base_train "
        r"and target_test",
    ):
        check_text_leakage(splits | {"target_test": leaked}, {"base": "base", "target": "target"})
    inside = splits["base_val"].copy()
    inside.loc[0, TEXT] = splits["base_test"].loc[1, TEXT]
    with pytest.raises(DataError, match="in both base_val and base_test"):
        check_text_leakage(splits | {"base_val": inside}, {"base": "base"})


def test_one_domain_splits_serve_both_roles() -> None:
    frame = make_text_frame()
    frame = frame[frame[DOMAIN] == "base"].reset_index(drop=True)
    splits = mirror_single_domain(split_domains(frame, SplitParams(), {"base": "base"}))
    assert sorted(splits) == sorted(f"{r}_{p}" for r in ("base", "target") for p in PARTS)
    for part in PARTS:
        assert splits[f"target_{part}"].equals(splits[f"base_{part}"])
    assert sum(len(splits[f"base_{p}"]) for p in PARTS) == len(frame)
    check_text_leakage(splits, {"base": "base"})


def _texts(values: list[str]) -> pd.DataFrame:
    return pd.DataFrame({TEXT: values, LABEL: 0, DOMAIN: "base"})


def test_text_drift_measures_length_shift_and_unseen_tokens() -> None:
    short = [f"good {w}" for w in ["day", "film", "plot", "cast"]]
    long = ["Good day, and a long plot " * 4, "film film FILM new words here " * 3] * 2
    splits = {
        "base_train": _texts(short),
        "base_val": _texts(short[:1]),
        "base_test": _texts(short[::-1]),
        "target_train": _texts(long),
        "target_val": _texts(long[:1]),
        "target_test": _texts(long),
    }
    report = text_drift_report(splits)
    same = report["summary"]["base_train_vs_test"]
    # The same texts in another order: no length shift and no unseen token.
    assert (same["length_psi"], same["length_ks"], same["unseen_token_share"]) == (0, 0, 0)
    gap = report["summary"]["domain_gap"]
    assert gap["length_ks"] == 1.0  # every target text is longer than every base text
    assert gap["length_psi"] > 0.25
    # Target tokens: "good day and a long plot" x4 (24) + "film film film new words here" x3
    # (18), twice each; base has good, day, film, plot, cast: unseen and, a, long, new,
    # words, here = (4 * 3 + 3 * 3) * 2 = 42 of 84 occurrences, 6 of 10 distinct tokens.
    assert gap["unseen_token_share"] == 0.5
    assert gap["unseen_vocabulary_share"] == 0.6
    assert gap["length_mean_reference"] == round((35 + 8 + 35) / 9, 6)  # 9 base texts
    assert report["features"] == {
        "text_length": {
            name: {
                "psi": report["summary"][name]["length_psi"],
                "ks": report["summary"][name]["length_ks"],
            }
            for name in ("domain_gap", "base_train_vs_test", "target_train_vs_test")
        }
    }
    assert most_shifted(report) == [{"feature": "text_length", "psi": gap["length_psi"], "ks": 1.0}]


def test_one_domain_text_drift_has_no_domain_gap() -> None:
    texts = [f"text number {i}" for i in range(10)]
    splits = {
        "base_train": _texts(texts[:6]),
        "base_val": _texts(texts[6:7]),
        "base_test": _texts(["text number 7", "brand new"]),
    }
    report = text_drift_report(splits, single_domain=True)
    assert list(report["summary"]) == ["base_train_vs_test"]
    # Test tokens: text, number, 7, brand, new: 7, brand and new are unseen (3 of 5).
    assert report["summary"]["base_train_vs_test"]["unseen_token_share"] == 0.6


# --- the stages on a text dataset ---------------------------------------------------------


@pytest.fixture
def text_repo(mlflow_client, tmp_path: Path):
    """cwd = tmp_path (conftest), with a reviews TSV under data/source/; MLflow's store exists."""
    rng = np.random.default_rng(1)
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}
    lines = ["review\trating\tsite"]
    for site in ("A", "B"):
        for label, vocab in words.items():
            for i in range(15):
                lines.append(f"{site} note {i}: {' '.join(rng.choice(vocab, 4))}\t{label}\t{site}")
    body = ("\n".join(lines) + "\n").encode()
    body += (
        b"caf\xe9 was good\tpos\tA\n"
        + b"A NOTE 0:  "
        + lines[1].split(": ")[1].split("\t")[0].upper().encode()
        + b"\tpos\tA\n"
    )
    (tmp_path / "data/source").mkdir(parents=True)
    (tmp_path / "data/source/reviews.tsv").write_bytes(body)
    return tmp_path


def _write_params(data: dict, validate_section: dict | None = None) -> None:
    import yaml

    base = {
        "source": "data/source/reviews.tsv",
        "text_column": "review",
        "label": "rating",
        "image_shape": None,
    }
    params = {
        "data": base | data,
        "validate": {"max_quarantine_fraction": 0.2} | (validate_section or {}),
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))


def test_ingest_validate_split_run_a_two_domain_text_dataset(text_repo: Path, capsys) -> None:
    from stages import ingest, split, validate
    from stages.core.common import layout
    from stages.core.common.io import read_json

    _write_params({"domain_column": "site", "base_domain": "A", "target_domain": "B"})
    ingest.main()
    raw = pd.read_parquet(layout.RAW)
    assert list(raw.columns) == [TEXT, LABEL, DOMAIN] and len(raw) == 62
    validate.main([])
    report = read_json(layout.VALIDATION_REPORT)
    assert (report["rows_in"], report["rows_clean"], report["rows_quarantined"]) == (62, 60, 2)
    rejected = pd.read_parquet(layout.REJECTED)
    assert rejected["reason"].tolist() == [
        "text is not valid UTF-8 (U+FFFD or a lone surrogate at character 3)",
        "text (normalized) duplicate of row 0",
    ]
    assert "validate.text_length" in layout.VALIDATION_HTML.read_text()
    split.main()
    parts = {p.stem: pd.read_parquet(p) for p in sorted(layout.SPLITS.glob("*.parquet"))}
    assert sorted(parts) == sorted(f"{r}_{p}" for r in ("base", "target") for p in PARTS)
    assert sum(len(f) for f in parts.values()) == 60
    assert set(parts["target_test"][DOMAIN]) == {"B"}
    metrics = read_json(layout.DRIFT_METRICS)
    assert sorted(metrics) == ["base_train_vs_test", "domain_gap", "target_train_vs_test"]
    assert pd.read_csv(layout.DRIFT_PLOT)["feature"].tolist() == ["text_length"]
    assert "domain gap: length PSI" in capsys.readouterr().out


def test_a_one_domain_text_dataset_splits_under_both_roles(text_repo: Path) -> None:
    from stages import ingest, split, validate
    from stages.core.common import layout
    from stages.core.common.io import read_json

    _write_params({"base_domain": "reviews"})
    ingest.main()
    assert set(pd.read_parquet(layout.RAW)[DOMAIN]) == {"reviews"}
    validate.main(["--infer-suite", "data/suites/text.json"])
    kinds = {item["type"]: item["kwargs"] for item in load_suite("data/suites/text.json")}
    assert kinds["expect_column_values_to_be_in_set"] == {
        "column": DOMAIN,
        "value_set": ["reviews"],
    }
    assert "expect_column_normalized_values_to_be_unique" in kinds
    validate.main([])
    assert read_json(layout.VALIDATION_REPORT)["passed"] is True
    split.main()
    for part in PARTS:
        base = pd.read_parquet(layout.split_path("base", part))
        assert base.equals(pd.read_parquet(layout.split_path("target", part)))
    assert list(read_json(layout.DRIFT_METRICS)) == ["base_train_vs_test"]


def test_a_missing_text_column_stops_ingest_in_one_line(text_repo: Path, capsys) -> None:
    from stages import ingest
    from stages.core.common.cli import run_stage

    _write_params({"text_column": "body"})
    with pytest.raises(SystemExit):
        run_stage("ingest", ingest.main, [])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "ingest: error: data.text_column: column 'body' not in data/source/reviews.tsv "
        "(columns: ['review', 'rating', 'site'])"
    )


def test_the_validation_page_shows_rejected_texts_shortened_and_escaped() -> None:
    from stages.core.data.validation_report import render_validation_html

    frame = make_text_frame()
    long = "<b>bold</b>   and\nnewline " + "word " * 40
    bad = pd.DataFrame(
        [
            {TEXT: long, LABEL: "pos", DOMAIN: "base"},
            {TEXT: "  ", LABEL: "neg", DOMAIN: "base"},
            {TEXT: None, LABEL: "neg", DOMAIN: "base"},
        ]
    )
    raw = pd.concat([frame, bad], ignore_index=True)
    result = _text_gate(
        raw, ValidateParams(text_length=(1, 100), max_quarantine_fraction=1.0, min_rows_per_class=1)
    )
    page = render_validation_html(result.report, result.expectations, result.rejected, "params")
    header = "<th>raw_row</th><th>text</th><th>label</th><th>domain</th><th>reason</th>"
    assert header in page
    shown = " ".join(long.split())[:79] + "\u2026"
    assert f"<td>{shown.replace('<', '&lt;').replace('>', '&gt;')}</td>" in page
    assert "<b>" not in page
    assert "<td>(blank)</td>" in page and "<td>(missing)</td>" in page


def test_a_text_source_over_http_is_checked_and_read(tmp_path: Path) -> None:
    import functools
    import hashlib
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    body = b'{"review": "good stuff", "rating": "pos"}\n{"review": "caf\xe9", "rating": "neg"}\n'
    (served / "reviews.jsonl").write_bytes(body)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no request lines on stderr
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # shutdown() waits up to one poll interval (0.5 s by default) per test
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/reviews.jsonl"
        params = _text_params(url, sha256=hashlib.sha256(body).hexdigest())
        raw = build_raw_dataset(load_source(params, tmp_path), params)
        assert raw[TEXT].tolist() == ["good stuff", "caf\ufffd"]
        assert raw[LABEL].tolist() == ["pos", "neg"]
        wrong = _text_params(url, sha256="0" * 64)
        with pytest.raises(DataError, match="sha256 mismatch"):
            load_source(wrong, tmp_path / "other")
    finally:
        server.shutdown()
        server.server_close()


def test_the_copy_kept_is_the_first_that_passes_the_other_checks() -> None:
    frame = make_text_frame()
    n = len(frame)
    copies = pd.DataFrame(
        [
            {TEXT: "Hello   World", LABEL: "pos", DOMAIN: "elsewhere"},
            {TEXT: "hello world", LABEL: "pos", DOMAIN: "base"},
            {TEXT: "HELLO WORLD", LABEL: "pos", DOMAIN: "target"},
        ]
    )
    result = _text_gate(pd.concat([frame, copies], ignore_index=True))
    reasons = dict(zip(result.rejected["raw_row"], result.rejected["reason"], strict=True))
    assert reasons == {
        n: "domain 'elsewhere' not in ['base', 'target']; text (normalized) duplicate of row "
        f"{n + 1}",
        n + 2: f"text (normalized) duplicate of row {n + 1}",
    }
    assert "hello world" in result.clean[TEXT].tolist()
    assert result.report["checks"]["duplicate"] == 2


TEXT_ALPHABET = ["a", "A", "b", " ", "\t", "\ufffd", "é"]

text_rows = st.lists(
    st.tuples(
        st.one_of(st.none(), st.text(alphabet=TEXT_ALPHABET, max_size=6)),
        st.sampled_from(["pos", "neg", None]),
        st.sampled_from(["base", "target", "elsewhere", None]),
    ),
    min_size=1,
    max_size=16,
)


def _values(frame: pd.DataFrame) -> list[list]:
    return [[None if pd.isna(v) else v for v in row] for row in frame.itertuples(index=False)]


@settings(max_examples=30, deadline=None)
@given(text_rows)
def test_the_text_gate_loses_nothing_and_lets_nothing_bad_through(rows) -> None:
    frame = pd.DataFrame(rows, columns=[TEXT, LABEL, DOMAIN]).astype(object)
    frame = frame.where(frame.notna(), None)
    limits = (1, 5)
    result = gate(
        frame,
        [],
        ValidateParams(text_length=limits, max_quarantine_fraction=1.0, min_rows_per_class=1),
        ["base", "target"],
        text=True,
    )
    report, clean, rejected = result.report, result.clean, result.rejected
    assert report["rows_in"] == len(frame) == report["rows_clean"] + report["rows_quarantined"]
    assert len(clean) == report["rows_clean"] and len(rejected) == report["rows_quarantined"]
    # Rejected rows keep their values; clean rows are exactly the others, in order.
    original = frame.iloc[rejected["raw_row"].to_numpy()]
    assert _values(rejected[[TEXT, LABEL, DOMAIN]]) == _values(original)
    assert (rejected["reason"].str.len() > 0).all()
    kept = frame.drop(index=rejected["raw_row"].tolist())
    assert _values(clean[[TEXT, LABEL, DOMAIN]]) == _values(kept)
    # Nothing bad in the clean table.
    texts = clean[TEXT].tolist()
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert all("\ufffd" not in t and limits[0] <= len(t) <= limits[1] for t in texts)
    assert clean[LABEL].notna().all() and clean[DOMAIN].isin(["base", "target"]).all()
    forms = [" ".join(t.split()).casefold() for t in texts]
    assert len(forms) == len(set(forms))
    # No clean text carries a label that another copy of it contradicts.
    for form in set(forms):
        labels = {
            lab
            for t, lab in zip(frame[TEXT], frame[LABEL], strict=True)
            if isinstance(t, str) and " ".join(t.split()).casefold() == form and lab is not None
        }
        assert len(labels) == 1
