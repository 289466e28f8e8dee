"""Language-model pretraining in the train stage (``model.arch: hf``, ``train.objective`` ``mlm``
or ``clm``): a BERT-style masked or GPT-style causal model, from scratch (``model.pretrained:
null``: ``model.hf``'s architecture with the tokenizer in ``models/tokenizer/``) or continued
from a checkpoint with its own tokenizer (domain-adaptive pretraining).

Texts become fixed-length blocks of token ids (``group_texts``, as HF's ``run_clm.py`` groups
them), trained through the one ``fit()`` with per-token targets (``BlockBatches``). The saved
``models/base`` is a Hugging Face masked- or causal-LM checkpoint with its tokenizer and our
metadata; the finetune stage loads it as a sequence classifier (transformers keeps the body,
drops the LM head and adds a classifier). transformers is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from stages.core.common import layout
from stages.core.common.digests import dvc_md5
from stages.core.common.errors import DataError, ModelError, ParamsError, one_line
from stages.core.common.layout import TOKENIZER_DIR
from stages.core.common.numbers import rounded
from stages.core.common.params import HfParams, Params
from stages.core.common.schema import LABEL, TEXT
from stages.core.engine.batches import BlockBatches
from stages.core.engine.checkpoints import Checkpoints
from stages.core.engine.loop_state import EpochStats
from stages.core.engine.training import FitResult, fit, fit_summary, history_rows
from stages.core.modeling import text

PRETRAINING = ("mlm", "clm")  # the train.objective values that pretrain a language model
DEFAULT_BLOCK_SIZE = 512  # train.block_size null: the model's positions, at most this
FORMATS = {"mlm": "hf-masked-lm", "clm": "hf-causal-lm"}
# Our names of model.hf -> the name HF's configs share; a family's config maps it onto its own
# through its attribute_map (GPT-2: n_embd, n_layer, n_head, n_positions). FAMILY_NAMES holds
# what no attribute_map says.
CONFIG_NAMES = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_positions": "max_position_embeddings",
}
FAMILY_NAMES = {"gpt2": {"intermediate_size": "n_inner"}}
# The samples a causal model writes into reports/samples.md: greedy continuations of the first
# words of the first validation texts.
SAMPLE_PROMPTS = 3
PROMPT_WORDS = 3
SAMPLE_TOKENS = 24


class LanguageModel(text.TextClassifier):
    """A Hugging Face masked or causal LM as ``fit()`` calls it: a batch's dict in, the
    per-token logits out (rows x positions x vocabulary); the classifier's wrapper, whose
    forward is the same call."""


@dataclass(frozen=True)
class Blocks:
    """Texts cut into blocks: the blocks' token ids, and what went in and was dropped."""

    blocks: list[list[int]]
    documents: int
    tokens: int  # the texts' tokens, special tokens included
    dropped: int  # tokens in no block: the packed remainder, or pieces of one token


def group_texts(ids: Sequence[Sequence[int]], block_size: int, pack: bool) -> Blocks:
    """Token ids of each text -> blocks of ``block_size``. ``pack``: the texts concatenated and
    cut into full blocks, the remainder (fewer than ``block_size`` tokens) dropped and counted,
    as ``run_clm.py``'s ``group_texts`` does. Else each text is cut on its own into pieces of at
    most ``block_size`` (shorter ones are padded in a batch), so that no block spans two texts;
    a piece of one token (nothing to predict) is dropped and counted."""
    tokens = sum(len(row) for row in ids)
    if pack:
        flat = [token for row in ids for token in row]
        usable = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, usable, block_size)]
        return Blocks(blocks, len(ids), tokens, len(flat) - usable)
    blocks = [list(row[i : i + block_size]) for row in ids for i in range(0, len(row), block_size)]
    kept = [block for block in blocks if len(block) >= 2]
    return Blocks(kept, len(ids), tokens, tokens - sum(len(block) for block in kept))


@dataclass(frozen=True)
class PretrainingTexts:
    """The texts a language model pretrains on, and how many were left out because a
    validation or test split holds them too."""

    texts: list[str]
    held_out: int
    source: str


def training_texts(
    corpus: Sequence[pd.DataFrame], held_out: Sequence[pd.DataFrame], source: str = "train splits"
) -> PretrainingTexts:
    """The texts the model trains on: those of ``corpus`` (the validated ``data.corpus``, or
    the labelled train splits, base and target, labels unused; see ``pretraining_splits``),
    each once, in order, minus every text that also stands in a ``held_out`` split (validation
    and test, of either domain): the last guard that no text the pipeline judges a model on is
    ever trained on (the tokenize stage's gate has already dropped them from a corpus)."""
    judged = {str(t) for frame in held_out for t in frame[TEXT].tolist()}
    seen: set[str] = set()
    texts, dropped = [], 0
    for frame in corpus:
        for item in map(str, frame[TEXT].tolist()):
            if item in seen:
                continue
            seen.add(item)
            if item in judged:
                dropped += 1
            else:
                texts.append(item)
    return PretrainingTexts(texts, dropped, source)


# The splits a pretraining run reads: the train splits' texts are its corpus, base val judges
# it, and every val and test split's texts are kept out of its training blocks.
TRAIN_SPLITS = (("base", "train"), ("target", "train"))
VAL_SPLIT = ("base", "val")
HELD_OUT_SPLITS = (("base", "val"), ("base", "test"), ("target", "val"), ("target", "test"))


def pretraining_inputs(params: Params) -> list[Path]:
    """The files a pretraining run's numbers depend on (its checkpoints' fingerprint): the
    splits it reads (base train and val first, as for classify), the validated corpus when
    ``data.corpus`` is set and, from scratch, the tokenizer."""
    names = dict.fromkeys([TRAIN_SPLITS[0], VAL_SPLIT, *TRAIN_SPLITS, *HELD_OUT_SPLITS])
    paths = [layout.split_path(*name) for name in names]
    paths += [layout.CORPUS] if params.data.corpus is not None else []
    return paths + ([TOKENIZER_DIR] if params.model.pretrained is None else [])


def pretraining_splits(
    params: Params,
) -> tuple[list[pd.DataFrame], pd.DataFrame, list[pd.DataFrame], str]:
    """The corpus (``data/corpus/corpus.parquet``, the tokenize stage's validated
    ``data.corpus``, or else the labelled train splits), the val split (its blocks judge the
    model), the held-out splits (val and test of both domains) and what the corpus is."""
    read = lambda name: pd.read_parquet(layout.split_path(*name))  # noqa: E731
    held_out = [read(n) for n in HELD_OUT_SPLITS]
    if params.data.corpus is not None:
        corpus, source = [pd.read_parquet(layout.CORPUS)], f"data.corpus {params.data.corpus}"
    else:
        corpus, source = [read(n) for n in TRAIN_SPLITS], "train splits"
    return corpus, read(VAL_SPLIT), held_out, source


def epoch_metrics(stats: EpochStats) -> dict:
    """An epoch's figures for MLflow: the losses, the masked- or next-token accuracy and the
    validation perplexity (left out where it overflows)."""
    values = {k: v for k, v in vars(stats).items() if k != "epoch"}
    value = perplexity(stats.val_loss)
    return values | ({} if value is None else {"val_perplexity": value})


def check_objective(objective: str, model_type: str) -> None:
    """``mlm`` needs a family with a masked-LM head (an encoder); ``clm`` a decoder: a family
    with a causal-LM head and no masked one (BERT has a causal head for encoder-decoder use,
    but is an encoder). Anything else is a ParamsError naming the key."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES as masked,
    )

    if objective == "mlm" and model_type not in masked:
        raise ParamsError(
            f"train.objective: mlm needs an encoder with a masked-LM head (bert, roberta, ...); "
            f"{model_type} has none (a decoder: use clm)"
        )
    if objective == "clm" and (model_type not in causal or model_type in masked):
        raise ParamsError(
            f"train.objective: clm needs a decoder (gpt2, llama, ...); {model_type} is "
            "an encoder (use mlm)"
        )


def hf_config(hf: HfParams, tokenizer: Any) -> Any:
    """The family's config for ``model.hf``: our names mapped onto its own (see
    ``CONFIG_NAMES``), the vocabulary and special ids from ``tokenizer``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(hf.model_type)
    except ValueError:
        raise ParamsError(
            f"model.hf.model_type: {hf.model_type!r} is not a model family this transformers "
            "knows (e.g. bert, gpt2)"
        ) from None
    family = FAMILY_NAMES.get(hf.model_type, {})
    known = config.to_dict()
    for ours, shared in CONFIG_NAMES.items():
        name = family.get(ours) or config.attribute_map.get(shared, shared)
        if name not in known:
            raise ParamsError(
                f"model.hf.{ours}: the {hf.model_type} config has no {shared} (nor {name}); "
                "this family is not one model.hf can describe"
            )
        setattr(config, name, getattr(hf, ours))
    config.vocab_size = len(tokenizer)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    return config


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer trained on the corpus (``models/tokenizer/``, saved with
    ``save_pretrained``); missing is a ModelError saying what writes it."""
    from transformers import AutoTokenizer

    if not (directory / "tokenizer_config.json").is_file():
        raise ModelError(
            f"{directory}: no tokenizer (tokenizer_config.json); model.pretrained: null "
            "pretrains from scratch with the tokenizer the tokenizer stage writes there"
        )
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory}: cannot load the tokenizer ({one_line(exc)})") from None


def load_language_model(
    params: Params, tokenizer_dir: Path = TOKENIZER_DIR
) -> tuple[Any, Any, dict]:
    """The model to pretrain, its tokenizer and its provenance: ``model.pretrained``'s
    checkpoint with an LM head and its own tokenizer, or, when null, ``model.hf``'s
    architecture from seeded random weights with the tokenizer in ``tokenizer_dir``."""
    text._quiet()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    objective, model = params.train.objective, params.model
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    if model.pretrained is None:
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2's tokenizers have no pad token
        config = hf_config(model.hf, tokenizer)  # first: an unknown family is its own error
        check_objective(objective, config.model_type)
        torch.manual_seed(params.train.seed)
        hf = auto.from_config(config)
        provenance = {
            "pretrained": "pretrained here",
            "revision": None,
            "sha256": "",
            "tokenizer_md5": dvc_md5(tokenizer_dir),
        }
    else:
        from transformers import AutoTokenizer

        source = text._source(model.pretrained)
        options = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(source, **options)
            check_objective(objective, config.model_type)
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
            hf = auto.from_pretrained(source, config=config, **options)
        except OSError as exc:
            raise text._hub_error(model.pretrained, exc) from None
        except ValueError as exc:
            raise ModelError(f"model.pretrained: {model.pretrained}: {one_line(exc)}") from None
        provenance = {
            "pretrained": model.pretrained,
            "revision": model.revision,
            "sha256": text._pretrained_sha256(source, model.revision),
        }
    text._fit_tokenizer(tokenizer, hf, model.pretrained or str(tokenizer_dir))
    if objective == "mlm" and tokenizer.mask_token_id is None:
        raise ModelError(
            f"train.objective: mlm needs a tokenizer with a mask token; that of "
            f"{model.pretrained or tokenizer_dir} has none"
        )
    if model.gradient_checkpointing:
        text.enable_gradient_checkpointing(hf)
    return hf, tokenizer, provenance


def block_size(requested: int | None, config: Any) -> int:
    """``train.block_size``, or the model's positions (at most ``DEFAULT_BLOCK_SIZE``) when
    null; above the positions is a ParamsError."""
    limit = text.max_positions(config)
    if requested is None:
        return min(limit or DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
    if limit is not None and requested > limit:
        raise ParamsError(
            f"train.block_size: {requested} is above the {limit} positions of this "
            f"{config.model_type} model; set it to {limit} or less"
        )
    return requested


def text_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids with the tokenizer's special tokens; a tokenizer that adds none
    (GPT-2's) gets its EOS token after each text, so that packed blocks mark where texts end."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in tokenizer("a", add_special_tokens=True)["input_ids"]:
        ids = [[*row, eos] for row in ids]
    return [row for row in ids if row]


def lm_blocks(
    tokenizer: Any, texts: Sequence[str], size: int, params: Params, split: str
) -> tuple[BlockBatches, Blocks]:
    """``texts`` as blocks for ``train.objective``; fewer tokens than one block is a DataError."""
    grouped = group_texts(text_ids(tokenizer, texts), size, params.train.pack)
    if not grouped.blocks:
        raise DataError(
            f"train.block_size: the {split} texts hold {grouped.tokens} tokens in "
            f"{grouped.documents} text(s), less than one block of {size}; lower "
            "train.block_size or give more text"
        )
    special = tuple(sorted(set(tokenizer.all_special_ids)))
    batches = BlockBatches.from_blocks(
        grouped.blocks,
        tokenizer.pad_token_id,
        objective=params.train.objective,
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=special,
        mlm_probability=params.train.mlm_probability,
    )
    return batches, grouped


def perplexity(loss: float) -> float | None:
    """exp(mean token loss); None where it overflows a float (or the loss is not finite)."""
    try:
        value = math.exp(loss)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def perplexity_rows(result: FitResult) -> list[dict]:
    """``history_rows`` with each epoch's validation perplexity (null where it overflows)."""
    rows = history_rows(result)
    for row, stats in zip(rows, result.history, strict=True):
        value = perplexity(stats.val_loss)
        row["val_perplexity"] = None if value is None else rounded(value)
    return rows


@dataclass
class PretrainRun:
    """A pretrained language model, its tokenizer, our metadata, what ``fit()`` reported and
    the figures of its texts and blocks."""

    model: LanguageModel
    tokenizer: Any
    config: text.TextModelConfig
    result: FitResult
    counts: dict
    samples: list[tuple[str, str]]


def pretrain(
    params: Params,
    train_splits: Sequence[pd.DataFrame],
    val: pd.DataFrame,
    held_out: Sequence[pd.DataFrame],
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    checkpoints: Checkpoints | None = None,
    progress: str | None = None,
    tokenizer_dir: Path = TOKENIZER_DIR,
    source: str = "train splits",
) -> PretrainRun:
    """Pretrain with ``train.objective`` on ``training_texts(train_splits, held_out)``,
    judged on ``val``'s texts (mean token loss, early stopping on it as for classify), with
    the train options and AdamW. A causal model then writes greedy samples."""
    objective = params.train.objective
    hf, tokenizer, provenance = load_language_model(params, tokenizer_dir)
    size = block_size(params.train.block_size, hf.config)
    corpus = training_texts(train_splits, held_out, source)
    train_blocks, train_grouped = lm_blocks(tokenizer, corpus.texts, size, params, "train")
    val_texts = [str(t) for t in val[TEXT].tolist()]
    val_blocks, val_grouped = lm_blocks(tokenizer, val_texts, size, params, "val")
    model = LanguageModel(hf)
    result = fit(
        model,
        train_blocks,
        val_blocks,
        text.text_fit_options(params.section("train")),
        on_epoch,
        checkpoints=checkpoints,
        progress=progress,
    )
    # The labels are unused here (a corpus has none); kept as what the classifier will face.
    labelled = [frame for frame in [*train_splits, val] if LABEL in frame]
    classes = sorted({label for frame in labelled for label in frame[LABEL].tolist()}, key=str)
    config = text.TextModelConfig(
        classes=classes,
        text_column=params.data.text_column or TEXT,
        max_length=text._max_length(params.model.max_length, hf.config),
        model_type=hf.config.model_type,
        head=[],  # no classifier yet: the finetune stage adds one
        provenance=provenance,
        trained_on={"objective": objective, "texts": len(corpus.texts), "source": corpus.source},
        format=FORMATS[objective],
    )
    counts = {
        "block_size": size,
        "pack": params.train.pack,
        "texts": {"train": len(corpus.texts), "val": len(val_texts), "held_out": corpus.held_out},
        "blocks": {"train": len(train_grouped.blocks), "val": len(val_grouped.blocks)},
        "tokens": {"train": train_grouped.tokens, "val": val_grouped.tokens},
        "dropped_tokens": {"train": train_grouped.dropped, "val": val_grouped.dropped},
    }
    samples = []
    if objective == "clm":
        samples = greedy_samples(hf, tokenizer, sample_prompts(val_texts), size)
    return PretrainRun(model, tokenizer, config, result, counts, samples)


def sample_prompts(texts: Sequence[str]) -> list[str]:
    """The fixed prompts: the first ``PROMPT_WORDS`` words of the first validation texts."""
    words = [t.split()[:PROMPT_WORDS] for t in texts]
    return [" ".join(w) for w in words if w][:SAMPLE_PROMPTS]


@torch.no_grad()
def greedy_samples(
    hf: nn.Module, tokenizer: Any, prompts: Sequence[str], limit: int
) -> list[tuple[str, str]]:
    """Each prompt and its greedy continuation (the most likely token each time, on the CPU:
    the same text every run) of up to ``SAMPLE_TOKENS`` tokens, stopping at EOS or after
    ``limit`` tokens in all."""
    hf.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][: limit - 1]
        new: list[int] = []
        for _ in range(min(SAMPLE_TOKENS, limit - len(ids))):
            logits = hf(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
        out.append((prompt, tokenizer.decode(new, skip_special_tokens=True)))
    return out


def samples_report(samples: Sequence[tuple[str, str]], objective: str) -> str:
    """``reports/samples.md``: the causal model's continuations, or a line saying why there
    are none (so that the file is always there, a static DVC output)."""
    lines = ["# Samples", ""]
    if objective != "clm":
        lines.append(
            f"None: samples come from a causal language model (train.objective: clm); this "
            f"run's objective is {objective}."
        )
        return "\n".join(lines) + "\n"
    lines.append(
        f"Greedy continuations (up to {SAMPLE_TOKENS} tokens) of the first {PROMPT_WORDS} "
        "words of the first validation texts, by the pretrained model:"
    )
    for prompt, continuation in samples:
        lines += ["", f"- **{prompt}** {continuation}".rstrip()]
    return "\n".join(lines) + "\n"


def pretraining_summary(run: PretrainRun) -> dict:
    """``metrics/train.json`` of a pretraining run: the kept epoch's losses, its masked- or
    next-token accuracy (``val_accuracy``), its perplexity (null with a note on overflow),
    and the texts, blocks and tokens."""
    summary = fit_summary(run.result) | {"objective": run.config.trained_on["objective"]}
    value = perplexity(run.result.best.val_loss)
    summary["val_perplexity"] = None if value is None else rounded(value)
    if value is None:
        summary["perplexity_note"] = "exp(val_loss) overflows a float: reported as null"
    return summary | run.counts
