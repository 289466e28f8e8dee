"""The one params loader: params.yaml -> typed, validated objects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.core.common.data_params import (
    DataParams,
    Section,
    SplitParams,
    ValidateParams,
)
from stages.core.common.errors import ParamsError, one_line
from stages.core.common.yaml_files import read_yaml

PARAMS_FILE = "params.yaml"


class CnnParams(Section):
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    kernel_size: int = Field(3, ge=1)

    @field_validator("channels")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError("every channel count must be >= 1")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd (the convolutions keep the image size)")
        return value


class TransformerParams(Section):
    width: int = Field(32, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    patch_size: int = Field(2, ge=1)
    mlp_ratio: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerParams:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        return self


class HfParams(Section):
    """arch hf from scratch (``model.pretrained: null``, ``train.objective`` mlm or clm): the
    architecture, in our names, which ``stages.core.modeling.pretraining`` maps onto the
    family's config (BERT's ``num_hidden_layers``, GPT-2's ``n_layer`` ...)."""

    model_type: str = Field("bert", min_length=1)  # bert | gpt2 | any family AutoConfig knows
    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)  # feed-forward width
    max_positions: int = Field(128, ge=2)  # position embeddings: the longest block

    @model_validator(mode="after")
    def _heads_divide_width(self) -> HfParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}"
            )
        return self


# Each kind's default special tokens. wordpiece: pad, unk, cls, sep, mask in this order;
# bpe: the end-of-text token (also bos, unk and pad). Entries after those are extra specials.
DEFAULT_SPECIAL_TOKENS = {
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bpe": ["<|endoftext|>"],
}


# Byte-level BPE starts from every byte: its vocabulary holds the 256 bytes and the specials.
BYTE_ALPHABET = 256


class TokenizerParams(Section):
    # pretrained: the checkpoint's own tokenizer; wordpiece (BERT-style) or bpe (GPT-style
    # byte-level BPE): trained on the pretraining texts by the tokenize stage.
    kind: Literal["pretrained", "wordpiece", "bpe"] = "pretrained"
    vocab_size: int = Field(8000, ge=1)
    lowercase: bool | None = None  # None: the kind's default (wordpiece yes, bpe no)
    special_tokens: list[str] | None = Field(None, min_length=1)  # None: the kind's defaults
    min_frequency: int = Field(2, ge=1)

    def check(self) -> None:
        """The special tokens a kind needs, and a vocabulary that holds them (and the bytes)."""
        if self.kind == "pretrained":
            return
        specials = self.specials()
        needed = len(DEFAULT_SPECIAL_TOKENS[self.kind])
        if len(specials) < needed:
            raise ValueError(
                f"model.tokenizer.special_tokens: {self.kind} needs at least {needed} "
                f"(in this order: {DEFAULT_SPECIAL_TOKENS[self.kind]}), got {specials}"
            )
        if len(set(specials)) != len(specials):
            raise ValueError(f"model.tokenizer.special_tokens: repeated tokens in {specials}")
        floor = len(specials) + (BYTE_ALPHABET if self.kind == "bpe" else 1)
        if self.vocab_size < floor:
            what = f"{len(specials)} special tokens" + (
                f" + the {BYTE_ALPHABET} bytes of byte-level BPE" if self.kind == "bpe" else ""
            )
            raise ValueError(
                f"model.tokenizer.vocab_size: {self.vocab_size} is smaller than the {what}; "
                f"raise it to at least {floor}"
            )

    def specials(self) -> list[str]:
        """The special tokens: the params' list, else the kind's defaults."""
        if self.special_tokens is not None:
            return list(self.special_tokens)
        return list(DEFAULT_SPECIAL_TOKENS.get(self.kind, []))

    def lowercases(self) -> bool:
        """Whether the tokenizer lower-cases: the param, else the kind's default."""
        return self.lowercase if self.lowercase is not None else self.kind == "wordpiece"


class ModelParams(Section):
    arch: Literal["mlp", "cnn", "transformer", "hf"] = "mlp"
    scaling: Literal["global", "per_feature"] = "global"
    hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    cnn: CnnParams = Field(default_factory=CnnParams)
    transformer: TransformerParams = Field(default_factory=TransformerParams)
    # arch hf: a Hugging Face checkpoint (a local folder, or a hub id pinned by revision).
    pretrained: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1)
    max_length: int | None = Field(None, ge=2)  # tokens; None = the model's positions, <= 512
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    hf: HfParams = Field(default_factory=HfParams)

    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError("every hidden width must be >= 1")
        return value

    def arch_options(self) -> dict:
        """The chosen arch's own hyperparameters (model.cnn / model.transformer); none for mlp."""
        if self.arch == "hf":
            keys = ("pretrained", "revision", "max_length", "trust_remote_code")
            options = {key: getattr(self, key) for key in keys}
            if self.pretrained is None:  # from scratch: the architecture is in params
                options["hf"] = self.hf.model_dump(mode="json")
            return options
        return {} if self.arch == "mlp" else getattr(self, self.arch).model_dump(mode="json")


class TrainParams(Section):
    # arch hf: classify fine-tunes the checkpoint on the base domain's labels; none takes it
    # into models/base as it is; mlm / clm pretrain a language model (masked, causal) on texts.
    objective: Literal["classify", "none", "mlm", "clm"] = "classify"
    mlm_probability: float = Field(0.15, gt=0, lt=1)  # mlm: share of tokens chosen as targets
    block_size: int | None = Field(None, ge=2)  # mlm/clm: tokens a block; None = positions, <= 512
    pack: bool = True  # mlm/clm: concatenate texts into blocks; false: a block stays in one text
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    patience: int | None = Field(10, ge=1)
    cpu_threads: int | None = Field(1, ge=1)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1)
    compile: bool = False
    # adamw decays only weights of 2+ dimensions (not biases or norms): what pretrained
    # transformers are fine-tuned with.
    optimizer: Literal["adam", "adamw"] = "adam"
    eval_batch_size: int | None = Field(None, ge=1)  # token batches; None = batch_size
    checkpoint_every: int | None = Field(5, ge=1)
    nproc: int = Field(1, ge=1)
    # With several processes: ddp replicates the model on every rank; fsdp shards parameters,
    # gradients and optimizer state (PyTorch's fully_shard). One process: no effect.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, pattern=r"^[^:\s]+:\d+$")

    @model_validator(mode="after")
    def _launch(self) -> TrainParams:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("rdzv_endpoint (host:port of node 0) is needed when nnodes > 1")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be < nnodes {self.nnodes}")
        if self.nproc * self.nnodes > 1 and re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(
                f"device {self.device!r} names one GPU; with several processes use cuda or auto "
                "(each process takes the GPU of its local rank)"
            )
        return self


class LoraParams(Section):
    # Measured on the digits (benchmarks/README.md): rank 8, alpha 16 and dropout 0.1 transfer
    # better than rank 4 without dropout, for the transformer and the mlp.
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)
    # arch hf: what models/finetuned keeps of a LoRA model: merged weights, the adapter (with
    # its head) on models/base, or both.
    save: Literal["merged", "adapter", "both"] = "merged"


class FinetuneParams(Section):
    # null: every labelled row of the target's train split.
    shots_per_class: int | None = Field(5, ge=1)
    strategy: Literal["head", "full", "lora"] = "head"
    # arch hf: how the head reads the body; null the architecture's own, mean every token's.
    pooling: Literal["mean"] | None = None
    body_lr: float | None = Field(None, gt=0)
    lora: LoraParams = Field(default_factory=LoraParams)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(50, ge=1)

    @model_validator(mode="after")
    def _body_lr_needs_full(self) -> FinetuneParams:
        if self.body_lr is not None and self.strategy != "full":
            raise ValueError(f"body_lr applies to strategy full only (strategy is {self.strategy})")
        return self


class EvaluateParams(Section):
    min_base_accuracy: float = Field(0.93, ge=0, le=1)
    min_transfer_gain: float = Field(0.03, ge=-1, le=1)
    min_class_recall: float | None = Field(None, ge=0, le=1)
    draws: int = Field(5, ge=1)
    # arch hf: what the from-scratch control trains; same: finetune.strategy (head: a head on
    # the random body's features), full: every layer.
    scratch_strategy: Literal["full", "same"] = "full"
    bootstrap_resamples: int = Field(2000, ge=100)
    bootstrap_seed: int = 42


class TrackingParams(Section):
    experiment: str = Field("finetune-pipeline", min_length=1)
    registered_model: str = Field("digits-classifier", min_length=1)


class Params(Section):
    """Every section of params.yaml; a missing section takes its defaults."""

    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    split: SplitParams = Field(default_factory=SplitParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _arch_fits_the_data(self) -> Params:
        shape, model = self.data.image_shape, self.model
        if model.arch == "cnn" and shape is None:
            raise ValueError(
                "model.arch: cnn needs data.image_shape ([H, W] or [C, H, W]), which is null"
            )
        pretraining = self.train.objective in ("mlm", "clm")
        if model.arch == "hf" and model.pretrained is None and not pretraining:
            raise ValueError(
                "model.arch: hf needs model.pretrained (a checkpoint folder or a hub id), or "
                "train.objective mlm or clm to pretrain model.hf's architecture from scratch"
            )
        if model.arch != "hf" and model.pretrained is not None:
            raise ValueError(f"model.pretrained applies to arch hf only (arch is {model.arch})")
        kind = model.tokenizer.kind
        if model.arch == "hf" and model.pretrained is None and kind == "pretrained":
            raise ValueError(
                "model.tokenizer.kind: pretraining from scratch (model.pretrained: null) needs a "
                "tokenizer trained on the corpus: wordpiece (BERT-style, mlm) or bpe "
                "(GPT-style, clm); pretrained means a checkpoint's own"
            )
        if model.arch == "hf" and model.pretrained is not None and kind != "pretrained":
            raise ValueError(
                f"model.tokenizer.kind: {kind} trains a new vocabulary, which the embeddings "
                f"of model.pretrained ({model.pretrained}) do not know; a checkpoint keeps its "
                "own tokenizer (kind: pretrained)"
            )
        if model.arch != "hf" and self.finetune.pooling is not None:
            raise ValueError(f"finetune.pooling applies to arch hf only (arch is {model.arch})")
        if model.arch != "hf" and self.evaluate.scratch_strategy != "full":
            raise ValueError(
                f"evaluate.scratch_strategy: same applies to arch hf only (arch is {model.arch})"
            )
        if self.train.objective != "classify" and model.arch != "hf":
            raise ValueError(
                f"train.objective: {self.train.objective} needs model.arch: hf (arch is "
                f"{model.arch}); the other archs train from scratch (classify)"
            )
        patch = model.transformer.patch_size
        if (
            model.arch == "transformer"
            and shape is not None
            and (shape[-1] % patch or shape[-2] % patch)
        ):
            raise ValueError(
                f"model.transformer.patch_size: {patch} does not divide data.image_shape {shape}"
            )
        return self

    @model_validator(mode="after")
    def _corpus_and_tokenizer(self) -> Params:
        # Here, not in their sections, so that the one-line error names the key in full.
        self.data.check_corpus()
        self.model.tokenizer.check()
        kind = self.model.tokenizer.kind
        if kind != "pretrained" and self.data.text_column is None:
            raise ValueError(
                f"model.tokenizer.kind: {kind} trains a tokenizer on text; it needs a text "
                "dataset (data.text_column), or set it to pretrained"
            )
        return self

    @model_validator(mode="after")
    def _text_has_no_features(self) -> Params:
        # Here, not in DataParams, so that the one-line error names the key in full.
        if self.data.text_column is not None:
            if self.data.text_column in (self.data.label, self.data.domain_column):
                raise ValueError(
                    f"data.text_column: {self.data.text_column!r} is also data.label or "
                    "data.domain_column; name the column holding the text"
                )
            if self.data.features is not None:
                raise ValueError(
                    "data.features: applies to numeric data; set it to null with data.text_column"
                )
            if self.data.image_shape is not None:
                raise ValueError(
                    "data.image_shape: applies to images; set it to null with data.text_column"
                )
        return self

    @model_validator(mode="after")
    def _hf_keeps_its_dropout(self) -> Params:
        # A Hugging Face model's dropout is its config's (the checkpoint's, or the family's
        # default from scratch): a model.dropout that did nothing would mislead.
        if self.model.arch == "hf" and self.model.dropout:
            raise ValueError(
                f"model.dropout: {self.model.dropout} applies to mlp, cnn and transformer; arch "
                "hf keeps its config's dropout (set model.dropout to 0)"
            )
        return self

    def section(self, name: str) -> dict:
        """One section as plain data, keyed as in params.yaml."""
        return getattr(self, "validate_" if name == "validate" else name).model_dump(mode="json")


def _describe(error: dict, path: Path) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections: its message names the keys
        return f"{path}: {message}"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}'"
    # A whole section as the bad input would bury the message: show values, not sections.
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        return f"{path}: {key}: {message} (got {error['input']!r})"
    return f"{path}: {key}: {message}"


def parse_params(raw: dict, path: Path | str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise ParamsError naming the first bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ParamsError(_describe(first, Path(path))) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read params.yaml once into typed params; raise ParamsError on any problem."""
    path = Path(path)
    try:
        raw = read_yaml(path) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, path)
