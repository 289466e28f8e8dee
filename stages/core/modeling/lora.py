"""LoRA through the peft library: which layers it adapts, wrapping, and merging back.

peft costs about 5 s to import, so it is imported inside the functions: a stage imports this
module always and peft only when ``finetune.strategy`` is ``lora``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from stages.core.common.errors import ParamsError
from stages.core.common.telemetry import silence
from stages.core.modeling.architectures import REGISTRY

ADAPTABLE = (nn.Linear, nn.Conv2d)


def adaptable_layers(body: nn.Module) -> list[str]:
    """Names (inside the body) of the layers LoRA can adapt: every Linear and Conv2d."""
    return [name for name, module in body.named_modules() if isinstance(module, ADAPTABLE)]


def resolve_targets(body: nn.Module, arch: str, requested: Sequence[str] | None) -> list[str]:
    """The body layers to adapt, in module order.

    ``requested`` (``finetune.lora.target_modules``) names layers as peft does: a full name
    (``blocks.0.attn.qkv``) or its last dotted parts (``qkv``, ``attn.qkv``). None takes the
    arch's default. A name that matches no adaptable layer is a ParamsError naming the key.
    """
    layers = adaptable_layers(body)
    wanted = requested if requested is not None else REGISTRY[arch].lora_targets
    if wanted is None:
        return layers
    chosen: set[str] = set()
    for target in wanted:
        hits = [name for name in layers if name == target or name.endswith(f".{target}")]
        if not hits:
            known = ", ".join(layers[:12]) + (", ..." if len(layers) > 12 else "")
            raise ParamsError(
                f"finetune.lora.target_modules: {target!r} matches no Linear or Conv2d layer "
                f"of the {arch} body (its layers: {known})"
            )
        chosen.update(hits)
    return [name for name in layers if name in chosen]


def add_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float,
) -> nn.Module:
    """``model`` (a Classifier) as a peft model: LoRA on the body's ``targets``, the head fully
    trained (``modules_to_save``), every other weight frozen. LoRA's A matrices draw from the
    global torch RNG, so seed it first."""
    silence()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[f"body.{name}" for name in targets],
        modules_to_save=["head"],
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters merged into its weights (loads without peft); a model
    without adapters is returned as it is."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if merge is not None else model
