"""Pretrained Hugging Face text classifiers (``model.arch: hf``): loading a checkpoint, its
tokenizer and head, the head / full / lora strategies, and the saved model directory.

Both families load through the same code: BERT-family encoders (bert, distilbert, roberta,
deberta-v2, MiniLM) and GPT-family decoders (gpt2, llama/qwen style) go through
``AutoTokenizer`` and ``AutoModelForSequenceClassification`` with ``id2label``/``label2id`` in
the config. A tokenizer without a pad token pads with its EOS token, and ``config.pad_token_id``
says so, which is what HF's last-non-pad-token pooling of the decoders reads.

A saved directory is a Hugging Face checkpoint (``config.json``, ``model.safetensors``, the
tokenizer's files) plus ``TEXT_META`` (our metadata: classes, text column, max length, where the
weights came from and their sha256), so it loads with ``from_pretrained`` as well as with
``load_text_model`` (only the latter reads the body the way ``finetune.pooling: mean`` trained
it). transformers (3-4 s to import) and peft (about 5 s) are imported inside the functions: a
module that imports this one pays for them only on the text path.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.common.digests import file_sha256
from stages.core.common.errors import ModelError, ParamsError, one_line
from stages.core.common.io import read_json, write_json
from stages.core.common.params import LoraParams, ModelParams
from stages.core.common.telemetry import silence
from stages.core.engine.inference import predict_proba
from stages.core.engine.training import FitOptions, fit_options
from stages.core.modeling.tokenization import tokenize

TEXT_META = "pipeline.json"  # beside HF's own config.json, which must keep its name
ADAPTER_DIR = "adapter"  # peft's adapter_config.json and adapter_model.safetensors (head included)
FORMS = ("merged", "adapter", "both")
WEIGHTS_FILE = "model.safetensors"
CLASSIFIER_FORMAT = "hf-sequence-classification"
LOAD_SEED = 0  # draws the weights a loaded checkpoint lacks (see load_text_model)
DEFAULT_MAX_LENGTH = 512  # model.max_length null: the model's positions, at most this
# Position embeddings these model types reserve for the padding offset (RoBERTa's ids start
# after padding_idx): their usable length is max_position_embeddings minus this.
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}
# LoRA's default targets where peft's own table (by model type) has none.
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


POOLINGS = ("mean",)  # finetune.pooling besides null (the architecture's own)


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier as ``fit()`` calls it: a token batch's dict in,
    logits out. ``hf`` is the transformers model (or, under LoRA, its peft wrapper).

    ``pooling`` None is the architecture's own (BERT's pooler on ``[CLS]``, a decoder's last
    token that is not padding); ``mean`` averages the body's last hidden states over the tokens
    that are not padding and hands that to the head (skipping BERT's pooler and the dropout
    before its head), as sentence encoders do: every token's state reaches the head, not one
    token's. transformers' own ``from_pretrained`` knows nothing of it: a saved mean-pooled
    model predicts as trained through ``load_text_model`` (and the MLflow model) only."""

    def __init__(self, hf: nn.Module, pooling: str | None = None):
        super().__init__()
        self.hf = hf
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling is None:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
        # Under LoRA, hf is peft's wrapper: the adapted layers sit inside its base model.
        hf = self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf
        states = hf.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        # Summed in float32: a bf16 sum counts tokens inexactly past 256 of them.
        mask = attention_mask.unsqueeze(-1).float()
        pooled = ((states.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).to(states.dtype)
        (head,) = head_modules(hf)  # checked by check_pooling
        # As one token ([rows, 1, width]): heads that take a sequence read its first token.
        return HeadOnly(hf.get_submodule(head))(pooled.unsqueeze(1))


def check_pooling(hf: nn.Module, pooling: str | None) -> None:
    """A ParamsError naming ``finetune.pooling`` for an unknown pooling, or ``mean`` on a
    model whose head is several modules (DistilBERT's, DeBERTa's pooler and classifier)."""
    if pooling is None:
        return
    if pooling not in POOLINGS:
        raise ParamsError(f"finetune.pooling: unknown pooling {pooling!r} (null or mean)")
    head = head_modules(hf)
    if len(head) != 1:
        raise ParamsError(
            f"finetune.pooling: mean needs a head of one module; this "
            f"{hf.config.model_type} model's is {len(head)} ({', '.join(head)})"
        )


@dataclass(frozen=True)
class TextModelConfig:
    """Our metadata of a text model directory (``TEXT_META``); HF's config is its own."""

    classes: list
    text_column: str
    max_length: int
    model_type: str
    head: list[str]  # the head's modules (trained by every strategy, kept by LoRA)
    # Where the weights came from: pretrained (folder or hub id), revision, sha256 of its
    # weights; a fine-tuned model keeps its base model's.
    provenance: dict
    trained_on: dict = field(default_factory=dict)
    weights_sha256: str = ""  # of this directory's model.safetensors (set when saved)
    # The LoRA adapter kept beside (or instead of) the merged weights, in ADAPTER_DIR: the base
    # checkpoint it adapts (folder), that folder's weights' sha256 and the adapter's own.
    adapter: dict = field(default_factory=dict)
    format: str = "hf-sequence-classification"  # CLASSIFIER_FORMAT; a pretrained LM's differs
    pooling: str | None = None  # TextClassifier's: None the architecture's own, or mean

    def replace(self, **changes: Any) -> TextModelConfig:
        return TextModelConfig(**(asdict(self) | changes))


def text_fit_options(section: dict, **overrides: Any) -> FitOptions:
    """``fit()``'s options for a text model from a params section (``train``): AdamW, whose
    decay spares biases and norms, unless ``overrides`` say otherwise."""
    return fit_options(section, **({"optimizer": "adamw"} | overrides))


def _quiet() -> None:
    """transformers' load reports, progress bars and advisory warnings off: the stages print
    their own one-line summaries (a fresh head is what we ask for)."""
    silence()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # peft asks for a property transformers 5 renamed; the warning is theirs to fix, not the user's.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


def _label_maps(classes: Sequence[Any]) -> dict:
    id2label = {i: str(label) for i, label in enumerate(classes)}
    return {
        "num_labels": len(classes),
        "id2label": id2label,
        "label2id": {name: i for i, name in id2label.items()},
    }


def _source(pretrained: str) -> str:
    """``model.pretrained`` as transformers takes it: a checkpoint folder, or a hub id. A path
    that names no folder (or one without config.json) is a ModelError naming the key."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.pretrained: {pretrained} has no config.json: not a Hugging Face "
                "checkpoint folder (save_pretrained writes one)"
            )
        return str(path)
    # A hub id is "name" or "org/name"; anything else (or a path that exists) means a folder.
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if looks_local or path.exists() or pretrained.startswith(("data/", "models/")):
        raise ModelError(
            f"model.pretrained: {pretrained}: no such checkpoint folder (give a folder with "
            "config.json, e.g. under data/ or models/, or a hub id such as org/name)"
        )
    return pretrained


def _hub_error(pretrained: str, exc: Exception) -> ModelError:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE=1 allows no download and it is not in the Hugging Face cache"
    else:
        why = one_line(exc, 160)
    return ModelError(
        f"model.pretrained: {pretrained!r} is not a local folder and cannot be loaded from "
        f"the hub ({why}); download it where there is network, or point to a local folder"
    )


def max_positions(config: Any) -> int | None:
    """Tokens the model's position embeddings allow (None: no such limit in its config)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value - POSITION_OFFSET.get(config.model_type, 0)
    return None


def _max_length(requested: int | None, config: Any) -> int:
    limit = max_positions(config)
    if requested is None:
        return min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if limit is not None and requested > limit:
        raise ParamsError(
            f"model.max_length: {requested} is above the {limit} positions of this "
            f"{config.model_type} model; set it to {limit} or less"
        )
    return requested


def head_modules(hf: nn.Module) -> list[str]:
    """Names of the classifier head's modules: the model's direct children, other than its
    pretrained body (``base_model``), that hold parameters (``classifier`` for BERT,
    ``score`` for GPT-2 and Llama, ``pre_classifier`` and ``classifier`` for DistilBERT)."""
    body = hf.base_model
    return [
        name
        for name, child in hf.named_children()
        if child is not body and any(True for _ in child.parameters())
    ]


def weights_sha256(folder: Path) -> str:
    """sha256 of a checkpoint's weights: of its one weights file, or, when sharded (or in
    another format), of the sorted ``name sha256`` lines of every weights file."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{path.name} {file_sha256(path)}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _pretrained_sha256(source: str, revision: str | None) -> str:
    folder = Path(source)
    if not folder.is_dir():  # a hub id, cached by from_pretrained a moment ago
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    return weights_sha256(folder)


def load_pretrained(
    params: ModelParams, classes: Sequence[Any], text_column: str
) -> tuple[TextClassifier, Any, TextModelConfig]:
    """``model.pretrained``'s tokenizer and a sequence classifier over ``classes`` (a fresh
    head), and the config our saved directory will carry.

    Bad input is one ModelError or ParamsError naming the key: a missing folder, a hub id that
    cannot be fetched, a tokenizer larger than the model's embeddings, ``model.max_length``
    above the model's positions, a tokenizer with neither a pad nor an EOS token.
    """
    _quiet()
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = _source(params.pretrained)
    options = {"revision": params.revision, "trust_remote_code": params.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **options, **_label_maps(classes))
    except OSError as exc:  # transformers reports a hub it cannot reach as an OSError
        raise _hub_error(params.pretrained, exc) from None
    except ValueError as exc:  # e.g. a model type this transformers does not know
        raise ModelError(f"model.pretrained: {params.pretrained}: {one_line(exc)}") from None
    max_length = _max_length(params.max_length, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        hf = AutoModelForSequenceClassification.from_pretrained(source, config=config, **options)
    except OSError as exc:
        raise _hub_error(params.pretrained, exc) from None
    except ValueError as exc:
        raise ModelError(f"model.pretrained: {params.pretrained}: {one_line(exc)}") from None
    _fit_tokenizer(tokenizer, hf, params.pretrained)
    if params.gradient_checkpointing:
        enable_gradient_checkpointing(hf)
    meta = TextModelConfig(
        classes=list(classes),
        text_column=text_column,
        max_length=max_length,
        model_type=config.model_type,
        head=head_modules(hf),
        provenance={
            "pretrained": params.pretrained,
            "revision": params.revision,
            "sha256": _pretrained_sha256(source, params.revision),
        },
    )
    return TextClassifier(hf), tokenizer, meta


def _fit_tokenizer(tokenizer: Any, hf: nn.Module, name: str) -> None:
    """Check the tokenizer against the model and give it a pad token (EOS) where it has none,
    telling the model's config (its pooling finds the last token that is not padding)."""
    embeddings = hf.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelError(
            f"model.pretrained: {name}: the tokenizer has {len(tokenizer)} tokens but the "
            f"model's embeddings hold {embeddings}: the tokenizer is not this model's"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"model.pretrained: {name}: the tokenizer has neither a pad nor an EOS token "
                "to pad batches with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    hf.config.pad_token_id = tokenizer.pad_token_id


def enable_gradient_checkpointing(hf: nn.Module) -> None:
    """Recompute activations in the backward pass (less memory, about a third more time)."""
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ParamsError(
            f"model.gradient_checkpointing: this {hf.config.model_type} model does not support it"
        )
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False


def with_new_head(
    model: TextClassifier,
    config: TextModelConfig,
    classes: Sequence[Any],
    seed: int,
    keep_body: bool = True,
    pooling: str | None = None,
) -> tuple[TextClassifier, TextModelConfig]:
    """A copy of ``model`` with a fresh, seeded head over ``classes`` (the body's weights
    copied), as the finetune stage starts from the base model, reading the body with
    ``pooling`` (see TextClassifier). ``keep_body=False`` gives the same architecture from
    random weights (the from-scratch baseline)."""
    _quiet()
    from transformers import AutoModelForSequenceClassification

    hf_config = copy.deepcopy(model.hf.config)
    for key, value in _label_maps(classes).items():
        setattr(hf_config, key, value)
    torch.manual_seed(seed)
    fresh = AutoModelForSequenceClassification.from_config(hf_config)
    head = head_modules(fresh)
    check_pooling(fresh, pooling)
    # A pretrained LM's metadata (format hf-masked-lm / hf-causal-lm) becomes a classifier's.
    config = config.replace(format=CLASSIFIER_FORMAT, pooling=pooling)
    body = {
        key: value for key, value in model.hf.state_dict().items() if key.split(".")[0] not in head
    }
    if not keep_body:
        return TextClassifier(fresh, pooling), config.replace(classes=list(classes), head=head)
    found = fresh.load_state_dict(body, strict=False)
    if found.unexpected_keys or any(k.split(".")[0] not in head for k in found.missing_keys):
        raise ModelError(f"the body does not fit a new head: {found}")
    if getattr(model.hf, "is_activation_checkpointing", False):
        enable_gradient_checkpointing(fresh)
    return TextClassifier(fresh, pooling), config.replace(classes=list(classes), head=head)


def optimizer_groups(
    model: TextClassifier, config: TextModelConfig, body_lr: float | None
) -> list[dict] | None:
    """AdamW groups with ``body_lr`` for the pretrained body and the optimizer's lr for the
    head (strategy full); None (one group) without ``body_lr``."""
    if body_lr is None:
        return None
    head = tuple(f"hf.{name}." for name in config.head)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    body = [p for name, p in trainable if not name.startswith(head)]
    rest = [p for name, p in trainable if name.startswith(head)]
    return [{"params": body, "lr": body_lr}, {"params": rest}]


def lora_targets(hf: nn.Module, requested: Sequence[str] | None) -> list[str] | str:
    """The layers LoRA adapts, as peft takes them: ``finetune.lora.target_modules`` (names or
    their last dotted parts, or ``all-linear``), or the model type's default (query/value for
    BERT, c_attn for GPT-2, q_proj/v_proj for Llama and Qwen; ``all-linear`` where none is
    known). A name that matches no layer is a ParamsError naming some that exist."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    model_type = hf.config.model_type
    if requested is None:
        requested = LORA_TARGETS.get(model_type) or table.get(model_type) or ["all-linear"]
    if list(requested) == ["all-linear"]:
        return "all-linear"
    head = tuple(head_modules(hf))
    layers = [
        name
        for name, module in hf.named_modules()
        if _adaptable(module) and not name.startswith(head)
    ]
    for target in requested:
        if not any(name == target or name.endswith(f".{target}") for name in layers):
            known = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in layers))
            shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
            raise ParamsError(
                f"finetune.lora.target_modules: {target!r} matches no linear layer of this "
                f"{model_type} model (its layers: {shown}; or all-linear)"
            )
    return list(requested)


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return isinstance(module, (nn.Linear, Conv1D))


def adapt(
    model: TextClassifier, config: TextModelConfig, strategy: str, lora: LoraParams | None = None
) -> TextClassifier:
    """Set what trains: ``head`` (the body frozen), ``full`` (everything) or ``lora`` (peft
    adapters on the body's target layers; the head always trains fully and is saved with the
    adapters through ``modules_to_save``). LoRA's A matrices draw from the global torch RNG,
    so seed it first. A LoRA model stays a peft model until ``merge``."""
    hf = model.hf
    hf.requires_grad_(strategy == "full")
    pooler = getattr(hf.base_model, "pooler", None)
    if model.pooling == "mean" and pooler is not None:
        pooler.requires_grad_(False)  # BERT's: mean pooling never reads it
    for name in config.head:
        hf.get_submodule(name).requires_grad_(True)
    if strategy in ("head", "full"):
        return model
    if strategy != "lora":
        raise ParamsError(f"finetune.strategy: unknown strategy {strategy!r} (head, full or lora)")
    silence()
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraParams()
    targets = lora_targets(hf, lora.target_modules)
    conv1d = targets != "all-linear" and any(
        type(module).__name__ == "Conv1D"
        for name, module in hf.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets)
    )
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=list(config.head),
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
    )
    return TextClassifier(get_peft_model(hf, peft_config), model.pooling)


def merge(model: TextClassifier) -> TextClassifier:
    """The plain transformers model with LoRA's adapters merged into its weights and the
    trained head in place (loads without peft); a model without adapters as it is."""
    unload = getattr(model.hf, "merge_and_unload", None)
    return model if unload is None else TextClassifier(unload(), model.pooling)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_text_model(
    directory: Path | str,
    model: TextClassifier,
    tokenizer: Any,
    config: TextModelConfig,
    form: str = "merged",
    adapter_base: Path | str | None = None,
) -> TextModelConfig:
    """Write the model as a Hugging Face checkpoint with its tokenizer and ``TEXT_META``; the
    directory is replaced as a whole, atomically (written beside it, then renamed into place).
    Returns the config as written, with the weights' sha256.

    A LoRA model is merged first (in place). ``form`` ``adapter`` or ``both`` also keeps its
    adapter, head included, in ``ADAPTER_DIR`` (``adapter`` alone writes no merged weights);
    ``adapter_base`` is the checkpoint folder the adapter goes on (the base model's).
    """
    if form not in FORMS:
        raise ParamsError(f"finetune.lora.save: unknown form {form!r} ({', '.join(FORMS)})")
    keeps_adapter = form != "merged" and hasattr(model.hf, "peft_config")
    # What this save writes decides these two: a config copied from the base model's (the
    # finetune stage's) carries the base's weights sha256, which an adapter-only directory
    # must not claim.
    config = config.replace(weights_sha256="", adapter={})
    if keeps_adapter and adapter_base is None:
        raise ModelError("saving a LoRA adapter needs the folder of the base it adapts")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if keeps_adapter:  # before merging, which folds the adapters into the weights
            model.hf.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
            config = config.replace(
                adapter={
                    "base": str(adapter_base),
                    "base_sha256": weights_sha256(Path(adapter_base)),
                    "sha256": weights_sha256(tmp / ADAPTER_DIR),
                }
            )
        hf = merge(model).hf
        if form == "adapter" and keeps_adapter:
            hf.config.save_pretrained(tmp)
        else:
            hf.save_pretrained(tmp, safe_serialization=True)
            config = config.replace(weights_sha256=weights_sha256(tmp))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / TEXT_META, asdict(config))
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            old.rename(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return config


def is_text_model(directory: Path | str) -> bool:
    """True when ``directory`` holds a text model (its ``TEXT_META``)."""
    return (Path(directory) / TEXT_META).is_file()


def load_text_model(
    directory: Path | str, form: str | None = None, base: Path | str | None = None
) -> tuple[TextClassifier, Any, TextModelConfig]:
    """A saved text model, its tokenizer and config, on the CPU: ``form`` ``merged`` (the
    default where merged weights exist) or ``adapter`` (the base checkpoint recorded in the
    metadata with the LoRA adapter and head on it, a peft model). A missing or unreadable file,
    or weights whose sha256 is not the one recorded, is a ModelError naming it. ``base``: where
    the adapter's base checkpoint is now (a copy elsewhere, e.g. among a served model's
    artifacts) instead of the folder recorded; its sha256 is checked all the same."""
    directory = Path(directory)
    meta_path = directory / TEXT_META
    for path in (meta_path, directory / "config.json"):
        if not path.is_file():
            raise ModelError(f"{path}: not found; run the stage that writes {directory} first")
    try:
        config = TextModelConfig(**read_json(meta_path))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{meta_path}: not a text model's metadata ({one_line(exc)})") from None
    if form is None:
        form = "merged" if config.weights_sha256 else "adapter"
    if form == "adapter":
        if not config.adapter:
            raise ModelError(f"{directory}: holds no LoRA adapter (saved as merged weights)")
        return _load_adapter(directory, config, base)
    _check_sha256(directory, config.weights_sha256, directory)
    _quiet()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # Weights the checkpoint lacks (a pretrained LM's BERT pooler) are drawn from a fixed
        # seed, so that every load of it is the same model; the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(LOAD_SEED)
            hf = AutoModelForSequenceClassification.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory}: cannot load the checkpoint ({one_line(exc)})") from None
    return TextClassifier(hf, config.pooling), tokenizer, config


def _check_sha256(folder: Path, expected: str, named: Path) -> None:
    found = weights_sha256(folder)
    if expected and found != expected:
        raise ModelError(
            f"{named}: the weights' sha256 {found[:12]}... is not the {expected[:12]}... "
            f"{TEXT_META} records: the files do not belong together"
        )


def _load_adapter(
    directory: Path, config: TextModelConfig, base: Path | str | None = None
) -> tuple[TextClassifier, Any, TextModelConfig]:
    base = Path(base if base is not None else config.adapter["base"])
    if not (base / "config.json").is_file():
        raise ModelError(f"{directory}: the adapter's base checkpoint {base} is not there")
    _check_sha256(base, config.adapter["base_sha256"], base)
    _check_sha256(directory / ADAPTER_DIR, config.adapter["sha256"], directory / ADAPTER_DIR)
    _quiet()
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    # The base's body under this model's config (its classes); the head comes from the adapter.
    hf = AutoModelForSequenceClassification.from_pretrained(
        base, config=AutoConfig.from_pretrained(directory), ignore_mismatched_sizes=True
    )
    peft_model = PeftModel.from_pretrained(hf, directory / ADAPTER_DIR)
    return TextClassifier(peft_model, config.pooling), tokenizer, config


@torch.no_grad()
def predict_texts(
    model: TextClassifier,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Class probabilities (float64, on the CPU) of raw ``texts``, one row per text."""
    tokens = tokenize(tokenizer, texts, max_length)
    return predict_proba(model, tokens.batches, batch_size)


class HeadOnly(nn.Module):
    """The head on cached inputs: ``[rows, width]``, or one token each (``[rows, 1, width]``)
    for heads that take a sequence; a per-token head's one token is its row's logits."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        return out[:, -1] if out.dim() == 3 else out
