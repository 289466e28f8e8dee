"""The pretraining corpus (stages/core/data/corpus.py): each form read, the gate's reasons,
no validation or test text in pretraining_texts, the one-line errors; and the tokenize stage
run as ``python -m stages.tokenize``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT
from test_sources import http_server  # noqa: F401 (the fixture: a real server on 127.0.0.1)

from scripts.sync_dvc_deps import dvc_stages
from stages.core.common import layout
from stages.core.common.errors import DataError
from stages.core.common.params import Params, parse_params
from stages.core.data.corpus import (
    build_corpus,
    pretraining_texts,
    read_corpus,
    texts_md5,
    validate_corpus,
)
from stages.core.data.text import normalize

SPLITS = {
    "base_train": ["the food was good", "a great day", "this movie was bad"],
    "base_val": ["Held Out Validation Text"],
    "base_test": ["a held out test text"],
    "target_train": ["target train one", "target train two"],
    "target_val": ["target validation text"],
    "target_test": ["target test text"],
}


def _params(**data) -> Params:
    text = {"text_column": "review", "image_shape": None, "domain_column": "site"}
    return parse_params({"data": text | data, "validate": {"text_length": [1, 60]}})


def _write_splits(root: Path, splits: dict[str, list[str]] = SPLITS) -> None:
    for name, texts in splits.items():
        frame = pd.DataFrame({"text": texts, "label": ["x"] * len(texts), "domain": "d"})
        path = root / layout.SPLITS / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)


def _corpus(root: Path, name: str, content: bytes | str) -> str:
    path = root / "data" / "source" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return f"data/source/{name}"


def test_txt_is_a_document_per_line_and_the_gate_gives_reasons(tmp_path: Path) -> None:
    _write_splits(tmp_path)
    lines = [
        "  first document  ",
        "",
        "second document",
        "   ",
        "FIRST   document",  # a copy after normalization
        "held out  validation text",  # a validation text of the labelled splits
        "A held out TEST text",  # a test text of the labelled splits
        "bad byte \xff here",
        "x" * 61,  # over validate.text_length
    ]
    raw = "\n".join(lines).replace("\xff", "\udcff").encode("utf-8", "surrogateescape")
    source = _corpus(tmp_path, "corpus.txt", raw)
    corpus = build_corpus(_params(corpus=source), tmp_path)
    assert corpus.clean["text"].tolist() == ["first document", "second document"]
    reasons = dict(zip(corpus.rejected["text"], corpus.rejected["reason"], strict=True))
    assert reasons == {
        "FIRST   document": "duplicate",
        "held out  validation text": "in_val_or_test",
        "A held out TEST text": "in_val_or_test",
        "bad byte \ufffd here": "invalid_utf8",
        "x" * 61: "text_length",
    }
    report = corpus.report
    assert report["rows_in"] == 7 == report["rows_clean"] + report["rows_quarantined"]
    assert report["quarantined"] == {
        "missing": 0,
        "blank": 0,
        "invalid_utf8": 1,
        "text_length": 1,
        "in_val_or_test": 2,
        "duplicate": 1,
    }
    assert report["texts_md5"] == texts_md5(["first document", "second document"])
    assert report["texts_md5"] == hashlib.md5(b"first document\0second document").hexdigest()


def test_a_folder_is_a_document_per_txt_file(tmp_path: Path) -> None:
    _corpus(tmp_path, "docs/b/2.txt", "second\nfile\n")
    _corpus(tmp_path, "docs/a.txt", "first file")
    _corpus(tmp_path, "docs/empty.txt", "\n")
    _corpus(tmp_path, "docs/.hidden/x.txt", "hidden")
    _corpus(tmp_path, "docs/notes.md", "not text")
    texts = read_corpus(_params(corpus="data/source/docs").data, tmp_path)
    assert texts.tolist() == ["first file", "second\nfile", ""]  # sorted paths
    corpus = validate_corpus(texts, (1, 100), set(), "docs")
    assert corpus.rejected.to_dict("records") == [{"text": "", "reason": "blank"}]


def test_a_table_column(tmp_path: Path) -> None:
    csv = _corpus(tmp_path, "c.csv", 'id,body,review\n1,one text,x\n2,,y\n3,"NA",z\n')
    texts = read_corpus(_params(corpus=csv, corpus_column="body").data, tmp_path)
    assert texts.tolist() == ["one text", None, "NA"]  # an empty cell is missing, "NA" is text
    corpus = validate_corpus(texts, (1, 100), set(), csv)
    assert corpus.report["quarantined"]["missing"] == 1 and corpus.report["rows_clean"] == 2
    rows = [{"review": "from jsonl"}, {"review": "second"}, {"other": 1}]
    jsonl = _corpus(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in rows))
    texts = read_corpus(_params(corpus=jsonl).data, tmp_path)  # column = data.text_column
    assert texts.tolist() == ["from jsonl", "second", None]
    pd.DataFrame({"review": ["p1", "p2"]}).to_parquet(tmp_path / "data/source/c.parquet")
    texts = read_corpus(_params(corpus="data/source/c.parquet").data, tmp_path)
    assert texts.tolist() == ["p1", "p2"]


def test_a_url_with_its_sha256(tmp_path: Path, http_server) -> None:  # noqa: F811
    url, handler = http_server
    body = b"one from the web\ntwo from the web\n"
    handler.files["corpus.txt"] = body
    sha = hashlib.sha256(body).hexdigest()
    params = _params(corpus=f"{url}/corpus.txt", corpus_sha256=sha)
    assert read_corpus(params.data, tmp_path).tolist() == ["one from the web", "two from the web"]
    assert (tmp_path / layout.SOURCE_CACHE / f"{sha}.txt").read_bytes() == body
    with pytest.raises(DataError, match="sha256 mismatch"):
        read_corpus(_params(corpus=f"{url}/corpus.txt", corpus_sha256="0" * 64).data, tmp_path)


def test_pretraining_texts_never_hold_a_val_or_test_text(tmp_path: Path) -> None:
    _write_splits(tmp_path)
    held_out = {normalize(t) for name, ts in SPLITS.items() if "train" not in name for t in ts}
    # Without a corpus: the labelled train splits, base then target.
    texts = pretraining_texts(_params(), tmp_path)
    assert texts == SPLITS["base_train"] + SPLITS["target_train"]
    one_domain = parse_params({"data": {"text_column": "review", "image_shape": None}})
    assert pretraining_texts(one_domain, tmp_path) == SPLITS["base_train"]
    # With a corpus that repeats every val and test text (case and spacing changed).
    every = [t.upper().replace(" ", "  ") for ts in SPLITS.values() for t in ts]
    source = _corpus(tmp_path, "corpus.txt", "\n".join(every + ["a new text"]))
    params = _params(corpus=source)
    corpus = build_corpus(params, tmp_path)
    (tmp_path / layout.CORPUS_DIR).mkdir()
    corpus.clean.to_parquet(tmp_path / layout.CORPUS, index=False)
    texts = pretraining_texts(params, tmp_path)
    assert len(texts) == 1 + len(SPLITS["base_train"]) + len(SPLITS["target_train"])
    assert not {normalize(t) for t in texts} & held_out
    assert corpus.report["quarantined"]["in_val_or_test"] == len(held_out)


@pytest.mark.parametrize(
    ("content", "data", "expected"),
    [
        (
            "\n \n\t\n",
            {},
            "data.corpus: no usable text in data/source/corpus.txt after validation (no rows); "
            "point data.corpus at a file with text",
        ),
        (
            "held out validation text\nheld out validation text\n",
            {},
            "data.corpus: no usable text in data/source/corpus.txt after validation "
            "(in_val_or_test 2); point data.corpus at a file with text",
        ),
        (None, {"corpus": "data/source/missing.txt"}, "data.corpus: file not found: "),
        (
            "review,label\nx,1\n",
            {"corpus": "data/source/corpus.csv", "corpus_column": "body"},
            "data.corpus_column: column 'body' is not in the corpus data/source/corpus.csv "
            "(its columns: ['review', 'label'])",
        ),
        (
            "body\nx\n",
            {"corpus": "data/source/corpus.csv"},
            "data.text_column: column 'review' is not in the corpus data/source/corpus.csv "
            "(its columns: ['body'])",
        ),
    ],
)
def test_bad_corpora_are_one_line(tmp_path: Path, content, data: dict, expected: str) -> None:
    _write_splits(tmp_path)
    name = Path(data.get("corpus", "data/source/corpus.txt")).name
    if content is not None:
        _corpus(tmp_path, name, content)
    with pytest.raises(DataError) as caught:
        build_corpus(_params(**({"corpus": "data/source/corpus.txt"} | data)), tmp_path)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"corpus": "corpus.txt"}, "data.corpus: 'corpus.txt' must be under data/source/"),
        ({"corpus": "https://example.invalid/c.txt"}, "data.corpus_sha256: required"),
        ({"corpus": "ftp://example.invalid/c.txt"}, "data.corpus: unknown scheme"),
    ],
)
def test_corpus_params_are_checked(data: dict, expected: str) -> None:
    from stages.core.common.errors import ParamsError

    with pytest.raises(ParamsError, match=f"^params.yaml: {expected}"):
        _params(**data)
    with pytest.raises(ParamsError, match="^params.yaml: data.corpus: pretraining text needs"):
        parse_params({"data": {"corpus": "data/source/c.txt"}})


def test_dvc_yaml_puts_tokenize_between_split_and_train() -> None:
    stages = dvc_stages()
    order = list(stages)
    assert order.index("split") + 1 == order.index("tokenize") == order.index("train") - 1
    tokenize = stages["tokenize"]
    assert tokenize["outs"] == ["data/corpus", "models/tokenizer"]
    assert [d for d in tokenize["deps"] if not d.startswith("stages/")] == [
        "data/source",
        "data/splits",
    ]
    # finetune.* never reruns it: no finetune param, and no dep that finetune writes.
    assert not [p for p in tokenize["params"] if p.split(".")[0] in ("finetune", "train")]
    assert "model.tokenizer" in tokenize["params"] and "data.corpus" in tokenize["params"]
    assert {"models/tokenizer", "data/corpus"} <= set(stages["train"]["deps"])


def _run(root: Path, code: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "PIPELINE_TRACKING": "off"}
    command = ["-c", code] if code else ["-m", "stages.tokenize"]
    return subprocess.run(
        [sys.executable, *command], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


_NO_HEAVY = (
    "import sys\nfrom stages.tokenize import main\nmain()\n"
    "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
)


def test_the_stage_without_text_writes_a_note_and_imports_no_model_library(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    done = _run(tmp_path, _NO_HEAVY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "tokenize: no tokenizer trained: the data has no text (data.text_column is null): "
        "nothing to tokenize",
        "[]",
    ]
    info = json.loads((tmp_path / layout.TOKENIZER_INFO).read_text())
    assert info == {"trained": False, "reason": info["reason"]}
    assert sorted(p.name for p in (tmp_path / layout.CORPUS_DIR).iterdir()) == ["report.json"]


def test_the_stage_with_a_missing_corpus_fails_in_one_line(tmp_path: Path) -> None:
    params = {"data": {"text_column": "review", "image_shape": None, "corpus": "data/source/x.txt"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _write_splits(tmp_path)
    done = _run(tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        "tokenize: error: data.corpus: file not found: data/source/x.txt; put the file or "
        "folder there or fix data.corpus\n"
    )


@pytest.mark.e2e  # a stage process that imports transformers (about 5 s)
def test_the_stage_trains_a_tokenizer_on_the_corpus(tmp_path: Path) -> None:
    _write_splits(tmp_path)
    lines = [f"document {i} about food and movies" for i in range(40)] + ["a great day"]
    _corpus(tmp_path, "corpus.txt", "\n".join(lines + ["held out validation text"]))
    params = {
        "data": {"text_column": "review", "image_shape": None, "domain_column": "site"},
        "model": {"tokenizer": {"kind": "wordpiece", "vocab_size": 90, "min_frequency": 1}},
    }
    params["data"]["corpus"] = "data/source/corpus.txt"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / layout.TOKENIZER_INFO).read_text())
    assert info["kind"] == "wordpiece" and info["texts"] == len(lines)
    assert info["texts_md5"] == texts_md5(lines)
    report = json.loads((tmp_path / layout.CORPUS_REPORT).read_text())["corpus"]
    assert report["rows_clean"] == len(lines) and report["quarantined"]["in_val_or_test"] == 1
    assert pd.read_parquet(tmp_path / layout.CORPUS_REJECTED)["reason"].tolist() == [
        "in_val_or_test"
    ]
    assert done.stdout.splitlines()[-1] == (
        f"tokenize: corpus {len(lines)} of {len(lines) + 1} texts kept (1 equal to a val/test "
        "text dropped) -> data/corpus/corpus.parquet"
    )
    first = {p.name: p.read_bytes() for p in (tmp_path / layout.TOKENIZER_DIR).iterdir()}
    assert _run(tmp_path).returncode == 0
    again = {p.name: p.read_bytes() for p in (tmp_path / layout.TOKENIZER_DIR).iterdir()}
    assert first == again  # byte-identical, from another process


def test_the_md5s_become_tags_of_the_run(mlflow_client) -> None:
    from conftest import TEST_EXPERIMENT

    from stages.core.tracking.runs import stage_run
    from stages.core.tracking.tags import set_tags

    with stage_run("tokenize", TEST_EXPERIMENT, {}) as run:
        run.send(set_tags, {"corpus_md5": "c" * 32, "tokenizer_md5": "t" * 32})
    tags = mlflow_client.get_run(run.id).data.tags
    assert (tags["corpus_md5"], tags["tokenizer_md5"]) == ("c" * 32, "t" * 32)
