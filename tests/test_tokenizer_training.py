"""The tokenizer the tokenize stage trains (stages/core/modeling/tokenizer_training.py):
WordPiece and byte-level BPE, reloaded through AutoTokenizer, deterministic across
processes, and the one-line errors of a vocabulary too small."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from tiny_text import labelled_texts

from stages.core.common.errors import ParamsError
from stages.core.common.params import TokenizerParams, parse_params
from stages.core.modeling.tokenizer_training import (
    INFO_FILE,
    no_tokenizer_reason,
    save_tokenizer,
    save_untrained,
    tokenizer_info,
    train_backend,
    train_tokenizer,
)

TEXTS = labelled_texts(120, seed=3)[0] + ["The Movie was GREAT, really great!"]


WORDPIECE = TokenizerParams(kind="wordpiece", vocab_size=120, min_frequency=1)


BPE = TokenizerParams(kind="bpe", vocab_size=300, min_frequency=1)


def _saved(folder: Path, params: TokenizerParams) -> Path:
    tokenizer = train_tokenizer(TEXTS, params)
    save_tokenizer(folder, tokenizer, tokenizer_info(params, tokenizer, "md5-of-texts", len(TEXTS)))
    return folder


def test_wordpiece_reloads_with_bert_specials(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    trained = train_tokenizer(TEXTS, WORDPIECE)
    folder = _saved(tmp_path / "wp", WORDPIECE)
    loaded = AutoTokenizer.from_pretrained(folder)
    text = "The movie was great"
    assert loaded(text)["input_ids"] == trained(text)["input_ids"]
    tokens = loaded.convert_ids_to_tokens(loaded(text)["input_ids"])
    assert tokens == ["[CLS]", "the", "movie", "was", "great", "[SEP]"]  # lower-cased
    pair = loaded.convert_ids_to_tokens(loaded("good", "bad")["input_ids"])
    assert pair == ["[CLS]", "good", "[SEP]", "bad", "[SEP]"]
    assert (loaded.pad_token, loaded.unk_token, loaded.mask_token) == ("[PAD]", "[UNK]", "[MASK]")
    assert [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id] == [0, 1, 2]
    pieces = loaded.convert_ids_to_tokens(loaded("tidy")["input_ids"])[1:-1]  # unseen word
    assert not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])
    assert "".join(p.removeprefix("##") for p in pieces) == "tidy"
    assert loaded.convert_ids_to_tokens(loaded("zebra")["input_ids"]) == ["[CLS]", "[UNK]", "[SEP]"]
    assert len(loaded) <= WORDPIECE.vocab_size
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["trained"] and info["kind"] == "wordpiece" and info["lowercase"] is True
    assert info["vocab_size"] == len(loaded) and info["texts"] == len(TEXTS)
    assert (
        info["tokenizer_md5"] == hashlib.md5((folder / "tokenizer.json").read_bytes()).hexdigest()
    )


def test_bpe_reloads_with_gpt2_specials(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = _saved(tmp_path / "bpe", BPE)
    loaded = AutoTokenizer.from_pretrained(folder)
    ids = loaded("The movie was GREAT")["input_ids"]
    eot = loaded.convert_tokens_to_ids("<|endoftext|>")
    assert eot not in ids  # no specials added to a text
    assert loaded.decode(ids) == "The movie was GREAT"  # byte-level: case and spaces kept
    assert loaded.pad_token == loaded.eos_token == loaded.bos_token == "<|endoftext|>"
    assert loaded.pad_token_id == eot == 0
    assert loaded.decode(loaded("naïve émoji 🙂")["input_ids"]) == "naïve émoji 🙂"  # no unknowns
    assert len(loaded) == BPE.vocab_size


_TRAIN_IN_A_PROCESS = """
import hashlib, sys
from tiny_text import labelled_texts
from stages.core.common.params import TokenizerParams
from stages.core.modeling.tokenizer_training import train_backend
texts = labelled_texts(120, seed=3)[0] + ["The Movie was GREAT, really great!"]
for kind, size in (("wordpiece", 120), ("bpe", 300)):
    backend = train_backend(texts, TokenizerParams(kind=kind, vocab_size=size, min_frequency=1))
    print(kind, hashlib.md5(backend.to_str().encode()).hexdigest())
"""


@pytest.mark.e2e  # spawns two Python processes (about 2-3 s)
def test_training_is_byte_identical_across_processes() -> None:
    """The tokenizers WordPiece trainer alone differs from one process to the next (hash-map
    order); ours must not."""
    env = os.environ | {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}
    processes = [  # side by side: two processes, two hash seeds
        subprocess.Popen(
            [sys.executable, "-c", _TRAIN_IN_A_PROCESS], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    runs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert runs[0] == runs[1]
    here = {
        kind: hashlib.md5(train_backend(TEXTS, p).to_str().encode()).hexdigest()
        for kind, p in (("wordpiece", WORDPIECE), ("bpe", BPE))
    }
    assert runs[0].split() == ["wordpiece", here["wordpiece"], "bpe", here["bpe"]]


def test_saved_folders_are_byte_identical(tmp_path: Path) -> None:
    for params in (WORDPIECE, BPE):
        a, b = _saved(tmp_path / "a", params), _saved(tmp_path / "b", params)
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        assert {"tokenizer.json", "tokenizer_config.json", INFO_FILE} <= set(files)
        for name in files:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_options_change_the_tokenizer() -> None:
    cased = train_backend(TEXTS, WORDPIECE.model_copy(update={"lowercase": False}))
    assert "T" in cased.get_vocab() and "T" not in train_backend(TEXTS, WORDPIECE).get_vocab()
    extra = train_backend(
        TEXTS, BPE.model_copy(update={"special_tokens": ["<|endoftext|>", "<x>"]})
    )
    assert extra.token_to_id("<x>") == 1
    frequent = train_backend(TEXTS, BPE.model_copy(update={"min_frequency": 50}))
    assert frequent.get_vocab_size() < BPE.vocab_size


def test_wordpiece_vocab_below_the_alphabet_is_one_line() -> None:
    with pytest.raises(ParamsError) as caught:
        train_backend(TEXTS, WORDPIECE.model_copy(update={"vocab_size": 20}))
    message = str(caught.value)
    assert message.startswith("model.tokenizer.vocab_size: 20 is below the ")
    assert "\n" not in message and "raise it to" in message


@pytest.mark.parametrize(
    ("tokenizer", "expected"),
    [
        (
            {"kind": "bpe", "vocab_size": 100},
            "params.yaml: model.tokenizer.vocab_size: 100 is smaller than the 1 special tokens "
            "+ the 256 bytes of byte-level BPE; raise it to at least 257",
        ),
        (
            {"kind": "wordpiece", "vocab_size": 4},
            "params.yaml: model.tokenizer.vocab_size: 4 is smaller than the 5 special tokens; "
            "raise it to at least 6",
        ),
        (
            {"kind": "wordpiece", "special_tokens": ["[PAD]", "[UNK]"]},
            "params.yaml: model.tokenizer.special_tokens: wordpiece needs at least 5 (in this "
            "order: ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']), got ['[PAD]', '[UNK]']",
        ),
    ],
)
def test_vocabulary_smaller_than_the_specials_is_one_line(tokenizer: dict, expected: str) -> None:
    raw = {"data": {"text_column": "t", "image_shape": None}, "model": {"tokenizer": tokenizer}}
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert str(caught.value) == expected


def test_which_runs_train_no_tokenizer(tmp_path: Path) -> None:
    digits = parse_params({})
    assert "data.text_column is null" in no_tokenizer_reason(digits)
    text = {"data": {"text_column": "t", "image_shape": None}}
    assert "pretrained" in no_tokenizer_reason(parse_params(text))
    trained = parse_params(text | {"model": {"tokenizer": {"kind": "bpe"}}})
    assert no_tokenizer_reason(trained) is None
    with pytest.raises(ParamsError, match=r"^params.yaml: model.tokenizer.kind: bpe trains"):
        parse_params({"model": {"tokenizer": {"kind": "bpe"}}})
    save_untrained(tmp_path / "tok", "why")
    assert [p.name for p in (tmp_path / "tok").iterdir()] == [INFO_FILE]
    assert (tmp_path / "tok" / INFO_FILE).read_text() == (
        '{\n  "reason": "why",\n  "trained": false\n}\n'
    )
