"""Which device and precision a run uses."""

from __future__ import annotations

import os

import torch

from stages.core.common.errors import ParamsError


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when it is available, else the CPU. Under torchrun, ``cuda`` is the
    GPU of the process's local rank. CUDA asked for but absent is a ParamsError naming
    ``train.device``."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ParamsError(
            f"train.device: {requested!r}, but PyTorch sees no CUDA device "
            f"(torch {torch.__version__}, {build}); use auto or cpu"
        )
    if device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index is not None and device.index >= count:
        raise ParamsError(f"train.device: {requested!r}, but there are {count} CUDA device(s)")
    return device


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for ``auto``; None means full fp32."""
    if requested == "bf16" or (requested == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
