"""Our training loop on a GPU: throughput, its ratio to a bare PyTorch loop, and MFU.

Models: the seed's network (784-128-64-10 MLP, Adam, sparse cross-entropy) on MNIST-sized
synthetic data (60,000 x 784), and the ViT-style transformer of stages.core.modeling.architectures
on the same rows as 28x28 images in 4x4 patches (49 patches + a class token), at widths 256, 512 and
1024, in bf16 autocast. For each: samples/s of ``fit()`` and of a bare loop doing the same work
(shuffle, index batches on the device, autocast, Adam, one val pass per epoch), their ratio, and
model FLOPs utilization against the GPU's dense bf16 peak (training FLOPs = 3 x the forward's
matmul and attention FLOPs, counted on the model itself). The last line printed is JSON.

    python -m benchmarks.gpu                     # on a CUDA machine
    python -m benchmarks.gpu --cpu               # small sizes, fp32, no MFU (what CI can run)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.architectures import SelfAttention
from stages.core.modeling.model import Classifier, ModelConfig

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), in TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}
CLASSES = 10
IMAGE = [28, 28]


def peak_tflops(name: str) -> float | None:
    """The datasheet bf16 peak of a GPU, matched on its name; None when unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def synthetic(rows: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-sized rows (784 features) around one random centre per class: learnable."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, 784, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, CLASSES, (rows,), generator=generator)
    x = centres[y] + torch.randn(rows, 784, generator=generator)
    return x.to(device), y.to(device)


def config(arch: str, options: dict | None = None, hidden: list[int] | None = None) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        n_features=784,
        hidden=hidden or [128, 64],
        dropout=0.0,
        classes=list(range(CLASSES)),
        feature_names=[f"p{i}" for i in range(784)],
        mean=[0.0] * 784,
        std=[1.0] * 784,
        image_shape=IMAGE,
        arch_options=options or {},
    )


def train_flops_per_sample(model: nn.Module) -> float:
    """3 x the forward's FLOPs per sample: every Linear (2 x in x out per row it sees) plus
    attention (QK^T and AV: 4 x tokens^2 x width per block)."""
    forward = 0.0

    def count_linear(module: nn.Linear, inputs, _output) -> None:
        nonlocal forward
        rows = inputs[0].numel() // module.in_features
        forward += 2 * module.in_features * module.out_features * rows

    def count_attention(_module, inputs, _output) -> None:
        nonlocal forward
        _batch, tokens, width = inputs[0].shape
        forward += 4 * tokens * tokens * width

    hooks = [
        m.register_forward_hook(count_linear) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    hooks += [
        m.register_forward_hook(count_attention)
        for m in model.modules()
        if isinstance(m, SelfAttention)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 784, device=next(model.parameters()).device))
    for hook in hooks:
        hook.remove()
    return 3 * forward


def bare_loop(model, x, y, x_val, y_val, epochs: int, batch: int, dtype) -> None:
    """The minimal equivalent of fit(): shuffle, index batches, autocast, Adam, a val pass."""
    device = x.device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype is not None)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            with torch.autocast(**autocast):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad(), torch.autocast(**autocast):
            float(nn.functional.cross_entropy(model(x_val).float(), y_val))


def timed(work: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    name: str,
    make: Callable[[], Classifier],
    data: tuple,
    args: argparse.Namespace,
    device: torch.device,
    peak: float | None,
) -> dict:
    x, y, x_val, y_val = data
    precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None
    options = FitOptions(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=1e-3,
        device=device.type,
        precision=precision,
        compile=args.compile,
    )
    # Warm-up of both loops (cuBLAS handles, the allocator, Adam's first import of dynamo).
    warm = slice(0, args.batch * 4)
    bare_loop(make().to(device), x[warm], y[warm], x_val, y_val, 1, args.batch, dtype)
    fit(make(), (x[warm], y[warm]), (x_val, y_val), FitOptions(**{**vars(options), "epochs": 1}))
    # Alternate the two loops and keep each one's best time. Models are built beforehand (a big
    # transformer's initialisation on the CPU takes a second); moving one to the device counts
    # in both loops, and fit() also moves it back to the CPU at the end.
    bare, ours = math.inf, math.inf
    for _ in range(args.repeats):
        model = make()

        def bare_work(m=model) -> None:
            bare_loop(m.to(device), x, y, x_val, y_val, args.epochs, args.batch, dtype)

        bare = min(bare, timed(bare_work, device))
        model = make()
        ours = min(ours, timed(lambda m=model: fit(m, (x, y), (x_val, y_val), options), device))
    model = make().to(device)
    flops = train_flops_per_sample(model)
    samples = args.epochs * len(x)
    result = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples_per_s": round(samples / ours, 1),
        "bare_samples_per_s": round(samples / bare, 1),
        "ratio": round(bare / ours, 3),
        "train_flops_per_sample": int(flops),
        "achieved_tflops": round(flops * samples / ours / 1e12, 2),
        "mfu": None if peak is None else round(flops * samples / ours / (peak * 1e12), 4),
    }
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    print(
        f"| {name} | {result['parameters']:,} | {result['samples_per_s']:,.0f} | "
        f"{result['bare_samples_per_s']:,.0f} | {result['ratio']:.2f} | "
        f"{result['achieved_tflops']:.1f} | {mfu} |",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU, fp32")
    parser.add_argument("--rows", type=int, help="training rows (60,000; 2,048 with --cpu)")
    parser.add_argument("--epochs", type=int, help="timed epochs (3; 1 with --cpu)")
    parser.add_argument("--batch", type=int, help="batch size (512; 256 with --cpu)")
    parser.add_argument("--widths", type=int, nargs="+", help="transformer widths")
    parser.add_argument("--depth", type=int, help="transformer blocks (6; 2 with --cpu)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each loop (best)")
    parser.add_argument("--compile", action="store_true", help="fit() with torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak, if the GPU is not known")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    args.rows = args.rows or (2048 if cpu else 60_000)
    args.epochs = args.epochs or (1 if cpu else 3)
    args.batch = args.batch or (256 if cpu else 512)
    args.widths = args.widths or ([32, 64] if cpu else [256, 512, 1024])
    args.depth = args.depth or (2 if cpu else 6)
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        torch.set_num_threads(1)
    name = "cpu" if cpu else torch.cuda.get_device_name(device)
    peak = None if cpu else (args.peak_tflops or peak_tflops(name))
    train = synthetic(args.rows, seed=1, device=device)
    val = synthetic(max(args.rows // 60, 64), seed=2, device=device)
    data = (*train, *val)
    print(f"device: {name}; bf16 peak: {peak} TFLOP/s; {args.rows:,} rows, {args.epochs} epochs, "
          f"batch {args.batch}{', torch.compile' if args.compile else ''}")  # fmt: skip
    print("| model | parameters | fit() samples/s | bare samples/s | ratio | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    results = []
    torch.manual_seed(0)
    results.append(
        measure("mlp 784-128-64-10", lambda: Classifier(config("mlp")), data, args, device, peak)
    )
    for width in args.widths:
        options = {
            "width": width,
            "depth": args.depth,
            "heads": max(1, width // 64),
            "patch_size": 4 if not cpu else 7,
            "mlp_ratio": 4,
        }
        results.append(
            measure(
                f"transformer w{width} d{args.depth}",
                lambda options=options: Classifier(config("transformer", options)),
                data,
                args,
                device,
                peak,
            )
        )
    summary = {
        "device": name,
        "torch": torch.__version__,
        "precision": "fp32" if cpu else "bf16",
        "peak_bf16_tflops": peak,
        "rows": args.rows,
        "epochs": args.epochs,
        "batch": args.batch,
        "compile": args.compile,
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
