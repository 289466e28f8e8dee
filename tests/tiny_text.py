"""Tiny pretrained-style checkpoints for the text tests, built offline in a few seconds.

Each is a Hugging Face folder (config, model.safetensors, tokenizer files) written with
``save_pretrained``: a BERT with a WordPiece tokenizer and a GPT-2 with a byte-level BPE
tokenizer, both trained here with the ``tokenizers`` library on this module's own texts, a few
thousand parameters each. The GPT-2 is saved without a pad token, as GPT-2 ships. Nothing is
downloaded. transformers is imported inside the functions (it costs seconds).
"""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ["good", "great", "happy", "love", "excellent", "nice"]
NEGATIVE = ["bad", "awful", "sad", "hate", "terrible", "poor"]
FILLER = ["the", "a", "movie", "was", "it", "very", "and", "food", "day", "this", "really"]
MAX_POSITIONS = 64


def labelled_texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` short texts whose label (``pos``/``neg``) is learnable from their words: each
    holds one or two sentiment words of its class among 2-12 filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(2, 12))
        for _ in range(rng.randint(1, 2)):
            words.insert(
                rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE)
            )
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _corpus() -> list[str]:
    texts, _ = labelled_texts(200, seed=0)
    return texts + [" ".join(POSITIVE + NEGATIVE + FILLER)]


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar


def bert_tokenizer(corpus: list[str] | None = None, vocab_size: int = 120):
    """A WordPiece tokenizer (BERT's special tokens) trained on ``corpus`` (default: this
    module's texts), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        corpus or _corpus(),
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special),
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
    )
    return fast


def build_bert(directory: Path) -> Path:
    """A 2-layer, 16-wide BERT with a WordPiece tokenizer, saved into ``directory``."""
    _quiet()
    from transformers import BertConfig, BertModel

    fast = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=fast.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def gpt2_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2's one special token, no pad token) trained on
    ``corpus`` (default: this module's texts), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus or _corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    return fast


def build_gpt2(directory: Path) -> Path:
    """A 2-layer, 16-wide GPT-2 with a byte-level BPE tokenizer and no pad token."""
    _quiet()
    from transformers import GPT2Config, GPT2Model

    fast = gpt2_tokenizer()
    eos = fast.eos_token_id
    config = GPT2Config(
        vocab_size=len(fast),
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=MAX_POSITIONS,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    import torch

    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
