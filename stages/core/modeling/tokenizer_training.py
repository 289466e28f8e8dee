"""A tokenizer trained on the pretraining texts with the ``tokenizers`` library
(``model.tokenizer``): WordPiece for a BERT-style model, byte-level BPE for a GPT-style one,
wrapped as a ``transformers.PreTrainedTokenizerFast`` and saved with ``save_pretrained``.

- ``wordpiece``: BERT's normalizer (lower-casing per ``model.tokenizer.lowercase``) and
  pre-tokenizer, ``##`` continuations, ``[CLS] x [SEP]`` (pairs ``[CLS] a [SEP] b [SEP]``)
  added to every text; the specials are pad, unk, cls, sep and mask in that order.
- ``bpe``: GPT-2's byte-level BPE (every byte in the alphabet: no unknown text), no special
  tokens added to a text; the one end-of-text token is bos, eos, unk and pad.

Training is deterministic: the same texts and params give a byte-identical ``tokenizer.json``
(the WordPiece vocabulary is learned by a BPE whose base symbols are in a fixed
order: see ``_wordpiece``). Nothing here imports torch; ``tokenizers`` and
transformers are imported by the functions that train and save, so a run that trains no
tokenizer (``no_tokenizer_reason``) never imports them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.common.errors import ParamsError
from stages.core.common.io import write_dir_atomic, write_json
from stages.core.common.params import Params, TokenizerParams

INFO_FILE = "tokenizer_info.json"


CONTINUATION = "##"


def no_tokenizer_reason(params: Params) -> str | None:
    """Why this run trains no tokenizer, or None when it trains one."""
    if params.data.text_column is None:
        return "the data has no text (data.text_column is null): nothing to tokenize"
    if params.model.tokenizer.kind == "pretrained":
        return "model.tokenizer.kind is pretrained: the checkpoint's own tokenizer is used"
    return None


# Marks the start of a word for the BPE that learns the WordPiece vocabulary (the first of
# these that the texts do not hold).
WORD_START_MARKS = ("\u2581", "\ue000", "\ue001", "\U000f0000")


def _wordpiece(texts: Sequence[str], params: TokenizerParams) -> Any:
    """BERT-style WordPiece, its vocabulary learned by BPE merges, as the ``tokenizers``
    WordPiece trainer does, but with every base symbol in a fixed order (that trainer numbers
    the ``##`` characters in a hash map's order, which breaks ties between equally frequent
    merges differently in each process). Each word (after BERT's normalizer and
    pre-tokenizer) is given a start mark; a learned piece with the mark is a word start, one
    without it a ``##`` continuation; every character is in the vocabulary both ways."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = params.specials()
    normalizer = normalizers.BertNormalizer(lowercase=params.lowercases())
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [
        [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
        for text in texts
    ]
    chars = sorted({c for text in words for word in text for c in word})
    mark = next(m for m in WORD_START_MARKS if m not in chars)
    floor = len(specials) + 2 * len(chars)
    if params.vocab_size < floor:
        raise ParamsError(
            f"model.tokenizer.vocab_size: {params.vocab_size} is below the {floor} tokens these "
            f"texts need (the {len(specials)} special tokens, and {len(chars)} characters as "
            f"word starts and as ## continuations); raise it to {floor} or more"
        )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size - len(specials) - len(chars),  # + the mark, - one char each
        min_frequency=params.min_frequency,
        initial_alphabet=[mark, *chars],
        show_progress=False,
    )
    learner.train_from_iterator((" ".join(mark + w for w in text) for text in words), trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    pieces = [
        token[1:] if token.startswith(mark) else CONTINUATION + token
        for token, _ in learned
        if token != mark and token not in chars and not (token[:1] == mark and len(token) == 2)
    ]
    order = [*specials, *chars, *(CONTINUATION + c for c in chars)]
    seen = set(order)
    order += [p for p in pieces if p not in seen and not seen.add(p)]
    order = order[: params.vocab_size]
    backend = Tokenizer(
        models.WordPiece(
            vocab={token: i for i, token in enumerate(order)},
            unk_token=specials[1],
            continuing_subword_prefix=CONTINUATION,
        )
    )
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix=CONTINUATION)
    backend.add_special_tokens(specials)
    return backend


def _byte_level_bpe(texts: Sequence[str], params: TokenizerParams) -> Any:
    """GPT-2's byte-level BPE trained on ``texts``: every byte is in the alphabet."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    backend = Tokenizer(models.BPE())
    if params.lowercases():
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=params.specials(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def train_backend(texts: Sequence[str], params: TokenizerParams) -> Any:
    """A ``tokenizers.Tokenizer`` trained on ``texts`` per ``params`` (kind wordpiece or
    bpe). A vocabulary too small for the characters the texts need is a ParamsError."""
    if params.kind == "bpe":
        return _byte_level_bpe(texts, params)
    if params.kind != "wordpiece":
        raise ParamsError(f"model.tokenizer.kind: {params.kind} trains no tokenizer")
    from tokenizers import processors

    backend = _wordpiece(texts, params)
    cls, sep = params.specials()[2:4]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )
    return backend


def wrap(backend: Any, params: TokenizerParams) -> Any:
    """``backend`` as a ``transformers.PreTrainedTokenizerFast`` with the kind's special
    tokens: BERT's five, or GPT-2's end-of-text token as bos, eos, unk and pad."""
    from transformers import PreTrainedTokenizerFast

    specials = params.specials()
    if params.kind == "wordpiece":
        roles = dict(zip(("pad", "unk", "cls", "sep", "mask"), specials[:5], strict=True))
    else:
        roles = dict.fromkeys(("bos", "eos", "unk", "pad"), specials[0])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="right",
        **{f"{role}_token": token for role, token in roles.items()},
    )


def train_tokenizer(texts: Sequence[str], params: TokenizerParams) -> Any:
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (see ``train_backend``)."""
    return wrap(train_backend(texts, params), params)


def tokenizer_info(params: TokenizerParams, tokenizer: Any, texts_md5: str, texts: int) -> dict:
    """What ``tokenizer_info.json`` says of a trained tokenizer (no paths, no times)."""
    return {
        "trained": True,
        "kind": params.kind,
        "vocab_size": len(tokenizer),
        "vocab_size_requested": params.vocab_size,
        "lowercase": params.lowercases(),
        "special_tokens": params.specials(),
        "min_frequency": params.min_frequency,
        "texts": texts,
        "texts_md5": texts_md5,
    }


def save_tokenizer(folder: Path | str, tokenizer: Any, info: dict) -> dict:
    """Save ``tokenizer`` (``save_pretrained``) and ``tokenizer_info.json`` into ``folder`` as
    a whole; returns ``info`` with the md5 of ``tokenizer.json``."""

    def write(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        digest = hashlib.md5((tmp / "tokenizer.json").read_bytes()).hexdigest()
        info["tokenizer_md5"] = digest
        write_json(tmp / INFO_FILE, info)

    write_dir_atomic(folder, write)
    return info


def save_untrained(folder: Path | str, reason: str) -> dict:
    """``folder`` holding only ``tokenizer_info.json``: no tokenizer was trained, and why."""
    info = {"trained": False, "reason": reason}
    write_dir_atomic(folder, lambda tmp: write_json(tmp / INFO_FILE, info))
    return info
