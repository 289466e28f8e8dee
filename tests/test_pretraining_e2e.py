"""Pretraining end to end: the train, finetune and evaluate stages in-process on a GPT-2
pretrained from scratch, DDP with two gloo processes, and a real SIGKILL of the train stage
resumed to the same bytes. Tiny models on generated text, offline."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import TEST_EXPERIMENT, spawn_ranks, state_copy, states_equal
from test_pretraining import build_tokenizers, lm_params, split

from stages.core.modeling import pretraining
from stages.core.modeling.pretraining import pretrain

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    return build_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def _text_project(root: Path, tokenizer: Path, kind: str) -> None:
    """params.yaml, data/splits/ (two text domains) and models/tokenizer/ in ``root``."""
    import shutil

    from stages.core.common.layout import TOKENIZER_DIR

    params = lm_params(kind).model_dump(mode="json", by_alias=True)
    params["tracking"]["experiment"] = TEST_EXPERIMENT
    params["train"] |= {"epochs": 3, "device": "cpu"}
    params["finetune"] |= {"strategy": "lora", "epochs": 2, "checkpoint_every": None}
    params["evaluate"] |= {"draws": 1, "bootstrap_resamples": 100, "min_transfer_gain": -1.0,
                           "min_base_accuracy": 0.0}  # fmt: skip
    params["tracking"]["registered_model"] = "pretrained-text-classifier"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/splits").mkdir(parents=True)
    for seed, (role, part, n) in enumerate(
        [
            ("base", "train", 80),
            ("base", "val", 24),
            ("base", "test", 24),
            ("target", "train", 40),
            ("target", "val", 16),
            ("target", "test", 16),
        ]  # fmt: skip
    ):
        split(n, seed + 10).to_parquet(root / f"data/splits/{role}_{part}.parquet", index=False)
    shutil.copytree(tokenizer, root / TOKENIZER_DIR)


def test_train_and_finetune_stages_pretrain_then_adapt(
    tokenizers, tmp_path, capsys, mlflow_client
) -> None:
    """The train, finetune and evaluate stages in-process: a GPT-2 pretrained from scratch
    with clm -> models/base (an LM), perplexity in metrics, plots and MLflow, samples in the
    report; then LoRA fine-tuning on it, and its evaluation against the baselines."""
    from stages import evaluate as evaluate_stage
    from stages import finetune as finetune_stage
    from stages import train as train_stage
    from stages.core.common.cli import run_stage

    _text_project(tmp_path, tokenizers["gpt2"], "gpt2")
    run_stage("train", train_stage.main)
    out = capsys.readouterr().out
    assert "train: clm pretraining of gpt2" in out and "pretrained here" in out
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics["objective"] == "clm" and metrics["epochs_run"] == 3
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    plot = pd.read_csv(tmp_path / "plots/train.csv")
    assert list(plot.columns)[-1] == "val_perplexity" and len(plot) == 3
    assert plot["val_perplexity"].iloc[-1] < plot["val_perplexity"].iloc[0]
    samples = (tmp_path / "reports/samples.md").read_text()
    assert samples.count("\n- **") == 3
    meta = json.loads((tmp_path / "models/base/pipeline.json").read_text())
    assert (
        meta["format"] == "hf-causal-lm" and meta["provenance"]["pretrained"] == "pretrained here"
    )
    (run,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name(TEST_EXPERIMENT).experiment_id],
        "tags.stage = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    history = mlflow_client.get_metric_history(run.info.run_id, "val_perplexity")
    assert [m.step for m in history] == [1, 2, 3]
    assert not (tmp_path / ".checkpoints/train").exists()

    run_stage("finetune", finetune_stage.main)
    out = capsys.readouterr().out
    assert "finetune: lora trained" in out and "of gpt2 on 40 rows" in out
    tuned = json.loads((tmp_path / "models/finetuned/pipeline.json").read_text())
    assert tuned["provenance"]["pretrained"] == "pretrained here"
    assert tuned["format"] == "hf-sequence-classification"

    run_stage("evaluate", evaluate_stage.main)
    evaluated = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert "base" not in evaluated and "zero_shot" not in evaluated  # the base has no head
    assert {"finetuned", "scratch", "sklearn"} <= evaluated.keys()


def _no_dropout(hf, tokenizer):
    config = _real_hf_config(hf, tokenizer)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, key, 0.0)
    return config


_real_hf_config = pretraining.hf_config


def _ddp_worker(rank: int, port: int, out: str, tokenizer: str) -> None:
    """One of two gloo ranks pretraining the same GPT-2 (dropout off, so that it can be
    compared with one process); each saves its weights and val losses."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pretraining.hf_config = _no_dropout
    runs = {}
    try:  # the same spawn pretrains under ddp, then under fsdp (two interpreters, not four)
        for parallel in ("ddp", "fsdp"):
            runs[parallel] = pretrain(
                _ddp_params(parallel), *_ddp_data(), tokenizer_dir=Path(tokenizer)
            )
    finally:
        dist.destroy_process_group()
    for parallel, run in runs.items():
        torch.save(
            {"state": state_copy(run.model), "val": [s.val_loss for s in run.result.history]},
            Path(out) / f"{parallel}-rank{rank}.pt",
        )


def _ddp_params(parallel: str = "ddp"):
    # Clipping makes the gradient's scale matter (AdamW alone would hide a wrong divisor).
    return lm_params("gpt2", epochs=2, grad_accum=2, batch_size=8, grad_clip=0.1, parallel=parallel)


def _ddp_data():
    return [split(60, 1)], split(24, 2), [split(24, 2)]


# Two interpreters importing torch and transformers: about 30 s on this busy CPU.
def test_ddp_and_fsdp_with_two_gloo_processes_train_like_one(
    tokenizers, tmp_path, monkeypatch
) -> None:
    """Under ddp and under fsdp, each rank takes its share of every step's blocks, the loss
    divided by the step's target tokens over both ranks: the ranks stay in step, and end where
    one process does (float rounding aside)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_ddp_worker, (port, str(tmp_path), str(tokenizers["gpt2"])))
    ranks = [torch.load(tmp_path / f"ddp-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["val"] == ranks[1]["val"]
    assert states_equal(ranks[0]["state"], ranks[1]["state"])
    monkeypatch.setattr(pretraining, "hf_config", _no_dropout)
    single = pretrain(_ddp_params(), *_ddp_data(), tokenizer_dir=tokenizers["gpt2"])
    single_val = [s.val_loss for s in single.result.history]
    for key, value in state_copy(single.model).items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5)
    assert ranks[0]["val"] == pytest.approx(single_val, 1e-4)
    # FSDP's shards: both ranks saw the same val losses; rank 0 holds the full final weights.
    sharded = [torch.load(tmp_path / f"fsdp-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sharded[0]["val"] == sharded[1]["val"] == pytest.approx(single_val, 1e-4)
    for key, value in state_copy(single.model).items():
        torch.testing.assert_close(sharded[0]["state"][key], value, rtol=1e-4, atol=1e-5)
    # ...and only rank 0 (fit trains a sharded copy and gathers it there): proof it sharded.
    assert not states_equal(sharded[0]["state"], sharded[1]["state"])


def _train_process(root: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"PIPELINE_TRACKING": "off", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"], cwd=root, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


# Three processes importing torch and transformers: about 35 s.
def test_a_sigkilled_train_stage_resumes_to_the_same_bytes(tokenizers, tmp_path) -> None:
    """python -m stages.train pretraining a BERT (mlm, dropout, masks from the generator),
    SIGKILLed once a checkpoint is on disk, then run again: models/base holds the bytes of
    an uninterrupted run's."""
    roots = {name: tmp_path / name for name in ("whole", "killed")}
    for root in roots.values():
        root.mkdir()
        _text_project(root, tokenizers["bert"], "bert")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"] |= {"epochs": 12, "checkpoint_every": 1}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        (root / "data/splits/base_train.parquet").unlink()
        split(600, 10).to_parquet(root / "data/splits/base_train.parquet", index=False)
    whole = _train_process(roots["whole"])
    killed = _train_process(roots["killed"])
    checkpoint = roots["killed"] / ".checkpoints/train/checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, killed.stdout.read()  # still training: the kill is mid-run
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (roots["killed"] / "models/base").exists()
    resumed = _train_process(roots["killed"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "train: resuming from" in out, out
    assert whole.communicate(timeout=300)[0] and whole.returncode == 0
    for name in ("model.safetensors", "pipeline.json"):
        first = (roots["whole"] / "models/base" / name).read_bytes()
        assert first == (roots["killed"] / "models/base" / name).read_bytes(), name
    for name in ("metrics/train.json", "plots/train.csv"):
        assert (roots["whole"] / name).read_text() == (roots["killed"] / name).read_text()
