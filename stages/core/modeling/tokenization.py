"""Texts -> token batches, once per stage run: a Hugging Face tokenizer's ids, truncated to
``model.max_length`` tokens, in ``TokenBatches`` that ``fit()`` pads per batch.

transformers is never imported here: the tokenizer object comes from
``stages.core.modeling.text``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stages.core.common.errors import DataError
from stages.core.engine.batches import TokenBatches


@dataclass(frozen=True)
class Tokenized:
    """Token batches of some texts and how many of them ``max_length`` cut short."""

    batches: TokenBatches
    truncated: int


def label_indices(labels: Sequence[Any], classes: Sequence[Any]) -> torch.Tensor:
    """Each label's index in ``classes``; a label outside them is a DataError."""
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in index}, key=str)
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the model's classes {list(classes)}")
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    y: Sequence[int] | torch.Tensor | None = None,
) -> Tokenized:
    """Token ids of ``texts`` (with the tokenizer's special tokens) as token batches; a text
    longer than ``max_length`` tokens is truncated (the tokenizer's own rule, so BERT keeps
    its closing ``[SEP]``) and counted. ``y`` (class indices) defaults to zeros (prediction)."""
    texts = [str(text) for text in texts]
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long:  # only these pay a second pass
        cut = tokenizer(
            [texts[i] for i in long],
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        for i, row in zip(long, cut, strict=True):
            ids[i] = row
    # An empty text through a tokenizer without special tokens (GPT-2) has no tokens; one EOS
    # (or pad) token stands in, so that every row has a last token to pool.
    filler = (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    )
    ids = [row if row else [filler] for row in ids]
    targets = torch.zeros(len(ids), dtype=torch.long) if y is None else y
    return Tokenized(TokenBatches.from_ids(ids, targets, tokenizer.pad_token_id), len(long))
