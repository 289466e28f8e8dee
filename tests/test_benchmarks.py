"""The benchmarks run (CPU mode here) and report what they claim to measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from benchmarks.gpu import peak_tflops


def test_gpu_benchmark_in_cpu_mode() -> None:
    command = [sys.executable, "-m", "benchmarks.gpu", "--cpu", "--rows", "512", "--widths", "16"]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
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
    for result in summary["results"]:
        assert result["samples_per_s"] > 0 and result["bare_samples_per_s"] > 0
        speed = result["samples_per_s"] / result["bare_samples_per_s"]
        assert result["ratio"] == pytest.approx(speed, abs=2e-3)
        assert result["mfu"] is None  # no bf16 peak for a CPU
    assert "| mlp 784-128-64-10 | 109,386 |" in done.stdout


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
def test_transfer_benchmark_reproduces_the_pipeline_figures(pristine_repo, pipeline_env) -> None:
    """With the default params, the benchmark's mlp/head row is what the evaluate stage wrote:
    the same base model, shots, draws and scores, computed by the same core functions."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.transfer", "--arch", "mlp", "--strategy", "head"],
        cwd=pristine_repo,
        # The repo's code and data first; benchmarks/ is not part of the pipeline's copy.
        env=pipeline_env | {"PYTHONPATH": os.pathsep.join([str(pristine_repo), str(REPO_ROOT)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    metrics = json.loads((pristine_repo / "metrics/evaluate.json").read_text())
    assert (row["arch"], row["strategy"], row["trainable_parameters"]) == ("mlp", "head", 650)
    assert row["base"] == metrics["base"]["accuracy"]
    assert row["zero_shot"] == metrics["zero_shot"]["accuracy"]
    assert {k: row[k] for k in metrics["transfer"]} == metrics["transfer"]
