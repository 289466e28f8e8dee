"""The benchmarks run (CPU mode here) and report what they claim to measure."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from benchmarks.gpu import peak_tflops


def run_benchmark(module: str, *args: str, cwd: Path = REPO_ROOT) -> tuple[list[str], dict]:
    """``python -m benchmarks.<module> args`` (offline) in ``cwd``, run in this process: its
    printed lines and the JSON summary its last line holds. A fresh interpreter would import
    torch, transformers and the project again: the three CPU-mode tests took 34-35 s of CPU
    as subprocesses, 15 s in process. What a benchmark sets for its process is put back:
    torch's thread count, the random states (transformers.Trainer seeds Python's and numpy's
    too), the environment, the folder and the command line."""
    import random

    import numpy as np
    import torch

    threads, environ, folder, argv = (
        torch.get_num_threads(),
        dict(os.environ),
        os.getcwd(),
        sys.argv,
    )
    states = random.getstate(), np.random.get_state()
    printed = io.StringIO()
    try:
        os.chdir(cwd)
        os.environ["HF_HUB_OFFLINE"] = "1"
        sys.argv = [f"benchmarks.{module}", *args]
        with torch.random.fork_rng(), contextlib.redirect_stdout(printed):
            importlib.import_module(f"benchmarks.{module}").main()
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(folder)
        sys.argv = argv
        random.setstate(states[0])
        np.random.set_state(states[1])
    lines = printed.getvalue().strip().splitlines()
    return lines, json.loads(lines[-1])


def test_gpu_benchmark_in_cpu_mode() -> None:
    lines, summary = run_benchmark("gpu", "--cpu", "--rows", "512", "--widths", "16")
    assert (summary["device"], summary["precision"], summary["peak_bf16_tflops"]) == (
        "cpu",
        "fp32",
        None,
    )
    mlp, transformer = summary["results"]
    assert (mlp["model"], transformer["model"]) == ("mlp 784-128-64-10", "transformer w16 d2")
    # 784-128-64-10: 3 x 2 x (784x128 + 128x64 + 64x10) multiply-adds per sample
    assert mlp["parameters"] == 109_386
    assert mlp["train_flops_per_sample"] == 3 * 2 * (784 * 128 + 128 * 64 + 64 * 10)
    # 7x7 patches of 28x28: 16 tokens + the class token, width 16, 2 blocks, mlp ratio 4
    embed = 2 * 49 * 16 * 16
    block = 17 * 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16) + 4 * 17 * 17 * 16
    assert transformer["train_flops_per_sample"] == 3 * (embed + 2 * block + 2 * 16 * 10)
    assert (summary["rows"], summary["epochs"], summary["batch"]) == (512, 1, 256)
    assert (summary["repeats"], summary["compile"]) == (2, False)
    assert lines[1].startswith("| model | parameters | fit() samples/s | bare samples/s | ratio")
    for result in summary["results"]:
        # The ratio is the one of the two rates, the achieved FLOP/s follow from fit()'s rate
        speed = result["samples_per_s"] / result["bare_samples_per_s"]
        assert result["ratio"] == pytest.approx(speed, abs=2e-3)
        flops = result["samples_per_s"] * result["train_flops_per_sample"] / 1e12
        assert result["achieved_tflops"] == pytest.approx(flops, abs=0.006)
        assert result["mfu"] is None  # no bf16 peak for a CPU
        # ... and the table printed above the JSON says the same
        row = (
            f"| {result['model']} | {result['parameters']:,} | {result['samples_per_s']:,.0f} | "
            f"{result['bare_samples_per_s']:,.0f} | {result['ratio']:.2f} | "
        )
        assert sum(line.startswith(row) for line in lines) == 1, row
    assert len(lines) == 3 + len(summary["results"]) + 1  # header, table, JSON


def test_the_bare_loop_does_the_work_of_fit() -> None:
    """The benchmark's ratio compares like with like: its bare loop and fit() with the
    benchmark's options make the same forward passes (train batches, one val pass an epoch)
    and end with the same weights."""
    import copy

    import torch

    from benchmarks.gpu import bare_loop, config, synthetic
    from stages.core.engine.training import FitOptions, fit
    from stages.core.modeling.model import Classifier

    cpu = torch.device("cpu")
    (x, y), (x_val, y_val) = synthetic(96, 1, cpu), synthetic(32, 2, cpu)
    torch.manual_seed(0)
    bare = Classifier(config("mlp", hidden=[16]))
    ours = copy.deepcopy(bare)
    calls = {"bare": [], "ours": []}
    for name, model in (("bare", bare), ("ours", ours)):
        model.register_forward_hook(
            lambda module, inputs, _out, name=name: calls[name].append(
                (module.training, len(inputs[0]))
            )
        )
    bare_loop(bare, x, y, x_val, y_val, epochs=2, batch=32, dtype=None)
    options = FitOptions(epochs=2, batch_size=32, lr=1e-3, device="cpu", precision="fp32")
    fit(ours, (x, y), (x_val, y_val), options)
    epoch = [(True, 32)] * 3 + [(False, 32)]  # 96 rows in batches of 32, then the val pass
    assert calls["bare"] == calls["ours"] == epoch * 2
    for key, value in bare.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_peak_table() -> None:
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_transfer_overrides_are_yaml_values_at_dotted_keys() -> None:
    from benchmarks.transfer import with_overrides

    raw = {"finetune": {"lr": 0.01, "lora": {"rank": 4}}}
    changed = with_overrides(
        raw, ["finetune.lora.rank=8", "finetune.lora.target_modules=[qkv, out]", "model.arch=cnn"]
    )
    assert changed == {
        "finetune": {"lr": 0.01, "lora": {"rank": 8, "target_modules": ["qkv", "out"]}},
        "model": {"arch": "cnn"},
    }


@pytest.mark.e2e
def test_transfer_benchmark_reproduces_the_pipeline_figures(pristine_repo) -> None:
    """With the default params, the benchmark's mlp/head row is what the evaluate stage wrote:
    the same base model, shots, draws and scores, computed by the same core functions."""
    # In the repo, as a user runs it there (its code is this checkout's, byte for byte).
    _, summary = run_benchmark("transfer", "--arch", "mlp", "--strategy", "head", cwd=pristine_repo)
    (row,) = summary["results"]
    metrics = json.loads((pristine_repo / "metrics/evaluate.json").read_text())
    assert (row["arch"], row["strategy"], row["trainable_parameters"]) == ("mlp", "head", 650)
    assert row["base"] == metrics["base"]["accuracy"]
    assert row["zero_shot"] == metrics["zero_shot"]["accuracy"]
    assert {k: row[k] for k in metrics["transfer"]} == metrics["transfer"]


def test_pretraining_benchmark_in_cpu_mode() -> None:
    """benchmarks.pretrain's CPU mode: our loop and transformers.Trainer pretrain the same GPT-2
    on the same blocks; the ratio, the FLOPs per token (PaLM's 6N + 12 L d T) and the table
    say what the JSON says."""
    lines, summary = run_benchmark("pretrain", "--cpu", "--rows", "32", "--repeats", "1")
    assert (summary["device"], summary["precision"], summary["peak_bf16_tflops"]) == (
        "cpu",
        "fp32",
        None,
    )
    assert (summary["rows"], summary["block"], summary["vocab"], summary["batch"]) == (
        32,
        64,
        512,
        8,
    )
    (result,) = summary["results"]
    assert result["model"] == "gpt2 w64 l2 h2"
    # GPT-2 of width 64, 2 layers, 512 tokens, 64 positions (the output embedding is tied)
    embeddings = 512 * 64 + 64 * 64
    layer = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert result["parameters"] == embeddings + 2 * layer + 2 * 64
    assert result["train_flops_per_token"] == 6 * result["parameters"] + 12 * 2 * 64 * 64
    assert result["ratio"] == pytest.approx(
        result["tokens_per_s"] / result["trainer_tokens_per_s"], abs=2e-3
    )
    assert result["mfu"] is None
    assert lines[1].startswith("| model | parameters | fit() tokens/s | Trainer tokens/s | ratio")
    row = f"| gpt2 w64 l2 h2 | {result['parameters']:,} | {result['tokens_per_s']:,.0f} | "
    assert sum(line.startswith(row) for line in lines) == 1
    assert len(lines) == 3 + 1 + 1  # header, one row, JSON: Trainer printed nothing of its own


def test_text_benchmark_in_cpu_mode(tiny_checkpoints) -> None:
    """benchmarks.text on a tiny BERT: our loop and transformers' Trainer on the same rows,
    padding to max_length, the head with and without cached body outputs; the printed ratios
    are the ones of the times in its JSON."""
    lines, summary = run_benchmark(
        "text", "--model", str(tiny_checkpoints["bert"]),
        "--texts", "synthetic", "--rows", "48", "--max-length", "32", "--batch", "8",
    )  # fmt: skip
    assert (summary["device"], summary["precision"], summary["rows"]) == ("cpu", "fp32", 48)
    assert (summary["max_length"], summary["batch"], summary["epochs"]) == (32, 8, 1)
    assert summary["data"] == "synthetic texts (tests/tiny_text.py)"
    assert (summary["clock"], summary["repeats"]) == ("cpu", 1)  # CPU seconds on the CPU
    seconds = summary["seconds"]
    assert all(value > 0 for value in seconds.values()), seconds
    assert summary["ratio_fit_over_trainer"] == pytest.approx(
        seconds["trainer"] / seconds["fit"], rel=0.02
    )
    assert summary["dynamic_padding_gain"] == pytest.approx(
        seconds["fit_padded_to_max_length"] / seconds["fit"], rel=0.02
    )
    assert summary["ratio_fit_over_trainer_group_by_length"] == pytest.approx(
        seconds["trainer_group_by_length"] / seconds["fit"], rel=0.02
    )
    assert summary["head_cache_gain"] == pytest.approx(
        seconds["head_uncached"] / seconds["head_cached"], rel=0.02
    )
    real = summary["real_tokens_per_epoch"]
    assert summary["tokens_per_s"]["fit"] == pytest.approx(real / seconds["fit"], rel=0.02)
    # The synthetic texts are short: grouped batches hold far fewer slots than 48 x 32
    slots = summary["padded_slots_per_epoch"]
    assert real <= slots["grouped"] < slots["max_length"] == 48 * 32
    # The printed ratio is the JSON's (printed to 2 decimals from the unrounded one)
    printed = re.search(r"ratio ours/Trainer: ([0-9.]+)x", "\n".join(lines))
    assert printed and float(printed[1]) == pytest.approx(
        summary["ratio_fit_over_trainer"], abs=0.006
    )


def test_padding_to_max_length_keeps_the_mask() -> None:
    """The benchmark's padded-to-max_length batches differ from the grouped ones in width
    only: the same ids and attention mask on the real tokens, padding masked out."""
    import torch

    from benchmarks.text import padded_to
    from stages.core.engine.batches import TokenBatches

    batches = TokenBatches.from_ids([[5, 6, 7], [8]], [0, 1], pad_id=0)
    wide = padded_to(batches, 16).inputs(torch.tensor([0, 1]))
    narrow = batches.inputs(torch.tensor([0, 1]))
    assert wide["input_ids"].shape == wide["attention_mask"].shape == (2, 16)
    assert torch.equal(wide["input_ids"][:, :3], narrow["input_ids"])
    assert torch.equal(wide["attention_mask"][:, :3], narrow["attention_mask"])
    assert wide["attention_mask"].sum().item() == 4
