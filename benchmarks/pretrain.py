"""GPT-style causal pretraining through our ``fit()``: tokens/s, model FLOPs utilization, and the
ratio to Hugging Face's ``transformers.Trainer`` on the same model, data and batch.

The model is a GPT-2 (``GPT2LMHeadModel`` from a config: dropout off, attention through
``scaled_dot_product_attention``) on blocks of synthetic token ids; throughput does not depend on
what the ids say. Our side is what the train stage runs for ``train.objective: clm``:
``BlockBatches`` (targets shifted in the batch source), AdamW (fused on CUDA), bf16 autocast on
CUDA, optionally ``torch.compile``, one validation pass an epoch. Trainer's side: the same model
class and initial weights, ``per_device_train_batch_size`` the same, AdamW, no evaluation, no
saving, no logging, dataloader in the main process.

Training FLOPs per token are PaLM's count: 6 x the parameters (the tied output embedding once)
plus 12 x layers x width x block size for attention's scores and values. MFU divides the achieved
FLOP/s by the GPU's dense bf16 peak (``benchmarks.gpu.PEAK_BF16_TFLOPS``). The last line printed
is JSON.

    python -m benchmarks.pretrain                 # on a CUDA machine: ~10M to ~350M parameters
    python -m benchmarks.pretrain --compile       # ... with torch.compile
    python -m benchmarks.pretrain --cpu           # tiny sizes, fp32, ours vs Trainer (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import torch

from benchmarks.gpu import peak_tflops, timed
from stages.core.engine.batches import BlockBatches
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.pretraining import LanguageModel

# (width, layers, heads) of the GPU sizes: about 10M, 124M (GPT-2 small) and 350M (GPT-2 medium)
# parameters with a 50,257-token vocabulary.
GPU_SIZES = [(128, 4, 2), (768, 12, 12), (1024, 24, 16)]
CPU_SIZES = [(64, 2, 2)]


def gpt2(width: int, layers: int, heads: int, vocab: int, positions: int, seed: int = 0):
    """A GPT-2 language model from a config, dropout off (so both loops do the same work)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied output embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def train_flops_per_token(model: torch.nn.Module, block: int) -> float:
    """PaLM's training FLOPs per token: 6 N + 12 x layers x width x block size."""
    config = model.config
    return 6 * parameters(model) + 12 * config.n_layer * config.n_embd * block


def synthetic_blocks(rows: int, block: int, vocab: int, seed: int) -> torch.Tensor:
    """``rows`` blocks of ``block`` random token ids (never the pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (rows, block), generator=generator)


def ours(model, train_ids, val_ids, args, device: torch.device) -> None:
    """What the train stage runs for objective clm, on these blocks."""

    def batches(ids):
        return BlockBatches.from_blocks(ids.tolist(), pad_id=0, objective="clm")

    options = FitOptions(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=3e-4,
        optimizer="adamw",
        weight_decay=0.1,
        device=device.type,
        precision="bf16" if device.type == "cuda" else "fp32",
        compile=args.compile,
        eval_batch_size=args.batch,
    )
    fit(LanguageModel(model), batches(train_ids), batches(val_ids), options)


def trainer(model, train_ids, args, device: torch.device, out: str):
    """``transformers.Trainer`` on the same blocks, ready to ``.train()``: labels = inputs (the
    model shifts them)."""
    os.environ.setdefault("WANDB_DISABLED", "true")
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()
    rows = [{"input_ids": ids, "labels": ids} for ids in train_ids]
    arguments = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=3e-4,
        weight_decay=0.1,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        lr_scheduler_type="constant",
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        torch_compile=args.compile,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    built = Trainer(model=model, args=arguments, train_dataset=rows)
    built.remove_callback(PrinterCallback)  # its end-of-training dict would break the table
    return built


def measure(size: tuple[int, int, int], args, device: torch.device, peak: float | None) -> dict:
    width, layers, heads = size
    name = f"gpt2 w{width} l{layers} h{heads}"

    def make():
        return gpt2(width, layers, heads, args.vocab, args.block)

    train_ids = synthetic_blocks(args.rows, args.block, args.vocab, seed=1)
    val_ids = synthetic_blocks(max(args.batch, args.rows // 50), args.block, args.vocab, seed=2)
    # Warm-up (allocator, kernels, the optimizers' first step), then the best of the repeats.
    warm = train_ids[: args.batch * 2]
    ours(make(), warm, val_ids[: args.batch], args, device)
    ours_s, trainer_s = math.inf, math.inf
    for _ in range(args.repeats):
        model = make()
        ours_s = min(
            ours_s, timed(lambda m=model: ours(m, train_ids, val_ids, args, device), device)
        )
        if args.trainer:  # built outside the clock; only its .train() is timed
            with tempfile.TemporaryDirectory() as out:
                built = trainer(make(), train_ids, args, device, out)
                trainer_s = min(trainer_s, timed(built.train, device))
    model = make()
    tokens = args.epochs * args.rows * args.block
    flops = train_flops_per_token(model, args.block)
    result = {
        "model": name,
        "parameters": parameters(model),
        "tokens_per_s": round(tokens / ours_s, 1),
        "trainer_tokens_per_s": None if not args.trainer else round(tokens / trainer_s, 1),
        "ratio": None if not args.trainer else round(trainer_s / ours_s, 3),
        "train_flops_per_token": int(flops),
        "achieved_tflops": round(flops * tokens / ours_s / 1e12, 3),
        "mfu": None if peak is None else round(flops * tokens / ours_s / (peak * 1e12), 4),
    }
    trainer_rate = "-" if result["ratio"] is None else f"{result['trainer_tokens_per_s']:,.0f}"
    ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}"
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    print(
        f"| {name} | {result['parameters']:,} | {result['tokens_per_s']:,.0f} | {trainer_rate} | "
        f"{ratio} | {result['achieved_tflops']:.3f} | {mfu} |",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU, fp32")
    parser.add_argument("--rows", type=int, help="training blocks (2,048; 64 with --cpu)")
    parser.add_argument("--block", type=int, help="tokens per block (1,024; 64 with --cpu)")
    parser.add_argument("--vocab", type=int, help="vocabulary (50,257; 512 with --cpu)")
    parser.add_argument("--batch", type=int, help="blocks per step (16; 8 with --cpu)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each loop (best)")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both loops")
    parser.add_argument("--no-trainer", dest="trainer", action="store_false",
                        help="skip transformers.Trainer (on a GPU it only costs time)")  # fmt: skip
    parser.add_argument("--sizes", nargs="+", help="width,layers,heads (e.g. 1024,24,16)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak, if the GPU is not known")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    args.rows = args.rows or (64 if cpu else 2048)
    args.block = args.block or (64 if cpu else 1024)
    args.vocab = args.vocab or (512 if cpu else 50_257)
    args.batch = args.batch or (8 if cpu else 16)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else None
    sizes = sizes or (CPU_SIZES if cpu else GPU_SIZES)
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        torch.set_num_threads(1)
    name = "cpu" if cpu else torch.cuda.get_device_name(device)
    peak = None if cpu else (args.peak_tflops or peak_tflops(name))
    print(f"device: {name}; bf16 peak: {peak} TFLOP/s; {args.rows:,} blocks of {args.block} "
          f"tokens, vocabulary {args.vocab:,}, batch {args.batch}, {args.epochs} epoch(s)"
          f"{', torch.compile' if args.compile else ''}")  # fmt: skip
    print("| model | parameters | fit() tokens/s | Trainer tokens/s | ratio | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    results = [measure(size, args, device, peak) for size in sizes]
    summary = {
        "device": name,
        "torch": torch.__version__,
        "precision": "fp32" if cpu else "bf16",
        "peak_bf16_tflops": peak,
        "rows": args.rows,
        "block": args.block,
        "vocab": args.vocab,
        "batch": args.batch,
        "epochs": args.epochs,
        "compile": args.compile,
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
