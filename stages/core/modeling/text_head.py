"""The ``head`` strategy of a text classifier the fast way (as Ludwig does): the frozen body's
outputs are computed once, and the head trains on them with ``fit()``'s tensor path instead of
running the whole model every epoch."""

from __future__ import annotations

from typing import Any

import torch

from stages.core.engine.batches import TokenBatches
from stages.core.engine.devices import resolve_device
from stages.core.engine.training import FitOptions, FitResult, fit
from stages.core.modeling.text import HeadOnly, TextClassifier, TextModelConfig


@torch.no_grad()
def head_inputs(
    model: TextClassifier, config: TextModelConfig, data: TokenBatches, batch_size: int
) -> torch.Tensor | None:
    """What the (frozen) body hands the head for each row of ``data``, computed once in eval
    mode: the head's input, captured by a hook, cut to the one token the model pools (the
    first, or the last that is not padding) when the head takes a sequence. Each batch checks
    that the head on these inputs gives the model's own logits; None where it does not, or
    where the head is several modules (DistilBERT, DeBERTa's pooler), so the caller trains
    through the whole model instead."""
    if len(config.head) != 1:
        return None
    head = model.hf.get_submodule(config.head[0])
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    model.eval()
    order = data.eval_order().to(data.ids.device)
    pieces, pick = [], None
    try:
        for idx in order.split(batch_size):
            inputs = data.inputs(idx)
            logits = model(**inputs)
            x = seen.pop()
            if x.dim() == 3 and x.shape[1] == 1:  # mean pooling hands the head one token
                options = {"first": x}
            elif x.dim() == 3:
                last = inputs["attention_mask"].sum(1) - 1
                rows = torch.arange(len(x), device=x.device)
                options = {"first": x[:, :1], "last": x[rows, last].unsqueeze(1)}
            else:
                options = {"row": x}
            for name in [pick] if pick else list(options):
                out = HeadOnly(head)(options[name])
                if out.shape == logits.shape and torch.allclose(out, logits, atol=1e-5):
                    pick = name
                    break
            else:
                return None
            pieces.append(options[pick].float())
    finally:
        handle.remove()
    return torch.cat(pieces)[torch.argsort(order)]


def fit_head_on_embeddings(
    model: TextClassifier,
    config: TextModelConfig,
    train: TokenBatches,
    val: TokenBatches,
    options: FitOptions,
    on_epoch: Any = None,
    **fit_kwargs: Any,
) -> FitResult | None:
    """The ``head`` strategy the fast way (as Ludwig does): the frozen body's outputs are
    computed once, and the head trains on them for every epoch with ``fit()``'s tensor path.
    The head is trained in place inside ``model``. None (nothing trained) where the head's
    inputs cannot be cached (see ``head_inputs``): then train the whole model with ``fit()``.
    The body's dropout is not applied to cached inputs."""
    device = resolve_device(options.device)
    model.to(device)
    batch = options.eval_batch_size or options.batch_size
    try:
        x_train = head_inputs(model, config, train.to(device), batch)
        x_val = head_inputs(model, config, val.to(device), batch) if x_train is not None else None
    finally:
        model.to("cpu")
    if x_train is None or x_val is None:
        return None
    head = HeadOnly(model.hf.get_submodule(config.head[0]))
    data = (x_train.cpu(), train.y.cpu()), (x_val.cpu(), val.y.cpu())
    return fit(head, *data, options, on_epoch, **fit_kwargs)
