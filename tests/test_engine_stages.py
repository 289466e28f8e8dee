"""The engine as the train and finetune stages use it: resumed MLflow runs, bad input as one
line, the torchrun launch. Stages run in-process in a temporary project (real MLflow store)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import TEST_EXPERIMENT, make_raw_frame

from stages import finetune as finetune_stage
from stages import train as train_stage
from stages.core.common.cli import run_stage
from stages.core.common.errors import ParamsError
from stages.core.common.params import TrainParams, parse_params
from stages.core.data.splitting import split_domains
from stages.core.engine.distributed import World, launch_command, needs_launch
from stages.core.tracking.runs import StageRun, stage_run

SMALL = {
    "data": {"image_shape": None},
    "model": {"hidden": [8], "scaling": "per_feature"},
    "train": {"epochs": 4, "patience": None, "device": "cpu", "checkpoint_every": 1},
    "finetune": {"epochs": 5, "shots_per_class": 2, "checkpoint_every": 1},
    "tracking": {"experiment": TEST_EXPERIMENT},
}


def _project(root: Path, **changes: dict) -> None:
    """params.yaml and data/splits/ of a tiny two-domain problem, in ``root``."""
    params = {k: SMALL.get(k, {}) | changes.get(k, {}) for k in SMALL.keys() | changes.keys()}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    splits = split_domains(
        make_raw_frame(rows_per_pair=20),
        parse_params(params).split,
        {"base": "base", "target": "target"},
    )
    (root / "data" / "splits").mkdir(parents=True)
    for name, frame in splits.items():
        frame.to_parquet(root / "data" / "splits" / f"{name}.parquet", index=False)


def _error_line(stage: str, main, capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        run_stage(stage, main)
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_stage_run_continues_the_run_of_its_resume_key(mlflow_client) -> None:
    """A resumed stage logs into the run it started before the kill: one run, one history;
    another key, or no resume, starts a new run."""
    key = uuid.uuid4().hex
    params = {"train": {"lr": 0.1}}
    with stage_run("train", TEST_EXPERIMENT, params, resume_key=key) as first:
        first.log_metrics({"val_loss": 1.0}, step=1)
    with stage_run("train", TEST_EXPERIMENT, params, resume_key=key, resuming=True) as again:
        again.log_metrics({"val_loss": 0.5}, step=2)
    assert again.id == first.id
    history = mlflow_client.get_metric_history(first.id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    run = mlflow_client.get_run(first.id)
    assert run.data.params == {"train.lr": "0.1"} and run.info.status == "FINISHED"
    with stage_run("train", TEST_EXPERIMENT, params, resume_key=key) as fresh:
        pass
    assert fresh.id != first.id
    with stage_run("train", TEST_EXPERIMENT, params, uuid.uuid4().hex, resuming=True) as other:
        pass
    assert other.id not in (first.id, fresh.id)


def test_train_then_finetune_clear_their_checkpoints(tmp_path, capsys, mlflow_client) -> None:
    _project(tmp_path)
    run_stage("train", train_stage.main)
    run_stage("finetune", finetune_stage.main)
    out = capsys.readouterr().out
    assert not (tmp_path / ".checkpoints" / "train").exists()
    assert not (tmp_path / ".checkpoints" / "finetune").exists()
    assert "train: epoch 4/4 loss " in out  # one line per epoch: pytest's output is no terminal
    assert "train: mlp of 67 parameters on 1 process(es), val accuracy " in out
    assert "finetune: head trained 27 of 67 parameters on 6 shots" in out
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert summary["parameters"] == 4 * 8 + 8 + 8 * 3 + 3


def test_train_resumes_its_checkpoint_and_mlflow_run(
    tmp_path, capsys, mlflow_client, monkeypatch
) -> None:
    """A checkpoint left by a killed train is resumed: same MLflow run, same final weights."""
    from safetensors.torch import load_file

    # An experiment of this test's own: the session's store holds other tests' train runs too.
    experiment = f"resume-{uuid.uuid4().hex}"
    _project(tmp_path, tracking={"experiment": experiment})
    run_stage("train", train_stage.main)
    expected = load_file(str(tmp_path / "models/base/model.safetensors"))

    class Killed(BaseException):  # like SIGKILL, nothing catches it
        pass

    def log_epoch_then_die(self, stats) -> None:
        real_log_epoch(self, stats)
        if stats.epoch == 3:
            raise Killed

    real_log_epoch = StageRun.log_epoch
    monkeypatch.setattr(StageRun, "log_epoch", log_epoch_then_die)
    with pytest.raises(Killed):
        run_stage("train", train_stage.main)
    monkeypatch.setattr(StageRun, "log_epoch", real_log_epoch)
    assert (tmp_path / ".checkpoints/train/checkpoint.pt").is_file()
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    (killed,) = mlflow_client.search_runs(
        [experiment_id], "tags.stage = 'train' and attributes.status = 'FAILED'"
    )
    run_id = killed.info.run_id
    capsys.readouterr()

    run_stage("train", train_stage.main)
    assert (
        "train: resuming from epoch 2 (.checkpoints/train/checkpoint.pt)" in capsys.readouterr().out
    )
    resumed = load_file(str(tmp_path / "models/base/model.safetensors"))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED" and "best_val_accuracy" in run.data.metrics
    steps = [m.step for m in mlflow_client.get_metric_history(run_id, "val_loss")]
    assert steps == [1, 2, 3, 3, 4]  # epoch 3 ran twice: killed before its checkpoint
    assert not (tmp_path / ".checkpoints/train").exists()


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch, stage: str) -> None:
    # A machine without a GPU and a CPU-only build, whatever this machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    _project(tmp_path, train={"device": "cuda"})
    main = {"train": train_stage.main, "finetune": finetune_stage.main}[stage]
    assert _error_line(stage, main, capsys) == (
        f"{stage}: error: train.device: 'cuda', but PyTorch sees no CUDA device "
        f"(torch {torch.__version__}, a CPU-only build); use auto or cpu"
    )


def test_missing_base_model_is_one_line(tmp_path, capsys) -> None:
    _project(tmp_path)
    assert _error_line("finetune", finetune_stage.main, capsys) == (
        "finetune: error: models/base/config.json: not found; run the stage that writes "
        "models/base first"
    )


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (b"", "finetune: error: models/base/model.safetensors: cannot read the weights ("),
        (b"\x00" * 64, "finetune: error: models/base/model.safetensors: cannot read the weights ("),
    ],
)
def test_corrupt_weights_are_one_line(tmp_path, capsys, damage: bytes, expected: str) -> None:
    _project(tmp_path)
    run_stage("train", train_stage.main)
    (tmp_path / "models/base/model.safetensors").write_bytes(damage)
    capsys.readouterr()
    assert _error_line("finetune", finetune_stage.main, capsys).startswith(expected)


def test_weights_of_another_model_are_one_line(tmp_path, capsys) -> None:
    _project(tmp_path)
    run_stage("train", train_stage.main)
    config_path = tmp_path / "models/base/config.json"
    config = json.loads(config_path.read_text())
    config["hidden"] = [9]
    config_path.write_text(json.dumps(config))
    capsys.readouterr()
    line = _error_line("finetune", finetune_stage.main, capsys)
    assert line.startswith(
        "finetune: error: models/base/model.safetensors: does not match config.json: "
    )
    assert "size mismatch for body.0.weight" in line


def test_lora_target_matching_nothing_is_one_line(tmp_path, capsys) -> None:
    _project(tmp_path, finetune={"strategy": "lora", "lora": {"target_modules": ["q_proj"]}})
    run_stage("train", train_stage.main)
    capsys.readouterr()
    assert _error_line("finetune", finetune_stage.main, capsys) == (
        "finetune: error: finetune.lora.target_modules: 'q_proj' matches no Linear or Conv2d "
        "layer of the mlp body (its layers: 0)"
    )


def test_nan_from_the_first_epoch_is_one_line(tmp_path, capsys) -> None:
    _project(tmp_path, train={"lr": 1e30, "patience": 3})
    line = _error_line("train", train_stage.main, capsys)
    assert line.startswith("train: error: val loss is nan after epoch 1 (train loss ")
    assert line.endswith("try a lower lr (now 1e+30)")


def test_finetune_with_lora_reports_what_trained(tmp_path, capsys) -> None:
    _project(tmp_path, finetune={"strategy": "lora", "lora": {"rank": 2}})
    run_stage("train", train_stage.main)
    run_stage("finetune", finetune_stage.main)
    assert "finetune: lora trained 51 of 67 parameters on 6 shots" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics/finetune.json").read_text())
    assert metrics["trainable_parameters"] == 2 * (4 + 8) + (8 * 3 + 3)
    tuned = pd.read_csv(tmp_path / "plots/finetune.csv")
    assert list(tuned.epoch) == [1, 2, 3, 4, 5]


# --- launching several processes ------------------------------------------------------------


def test_launch_command_single_node() -> None:
    train = TrainParams(nproc=8)
    command = launch_command("stages.train", train)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=8",
        "--standalone",
        "-m",
        "stages.train",
    ]


def test_launch_command_several_nodes() -> None:
    train = TrainParams(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="node0.cluster:29500")
    assert launch_command("stages.train", train)[4:7] == [
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-endpoint=node0.cluster:29500",
    ]


def test_needs_launch(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not needs_launch(TrainParams())
    assert needs_launch(TrainParams(nproc=2))
    monkeypatch.setenv("LOCAL_RANK", "0")  # a torchrun worker never launches again
    assert not needs_launch(TrainParams(nproc=2))


def test_world_of_one() -> None:
    world = World()
    assert world.is_main and world.size == 1 and world.gather({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"nnodes": 2}, "train: rdzv_endpoint (host:port of node 0) is needed when "),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "train: node_rank 2"),
        ({"nproc": 2, "device": "cuda:1"}, "train: device 'cuda:1' names one GPU"),
        ({"rdzv_endpoint": "no-port"}, "train.rdzv_endpoint: "),
        ({"nproc": 0}, "train.nproc: "),
        ({"grad_accum": 0}, "train.grad_accum: "),
        ({"schedule": "step"}, "train.schedule: "),
        ({"grad_clip": 0}, "train.grad_clip: "),
        ({"checkpoint_every": 0}, "train.checkpoint_every: "),
    ],
)
def test_bad_engine_params_are_one_line(train: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as caught:
        parse_params({"train": train})
    assert str(caught.value).startswith(f"params.yaml: {expected}")


@pytest.mark.parametrize(
    ("finetune", "expected"),
    [
        ({"body_lr": 0.001}, "finetune: body_lr applies to strategy full only"),
        ({"strategy": "lora", "lora": {"rank": 0}}, "finetune.lora.rank: "),
        ({"strategy": "lora", "lora": {"target_modules": []}}, "finetune.lora.target_modules: "),
        ({"strategy": "lora", "lora": {"rnak": 4}}, "unknown key 'finetune.lora.rnak'"),
    ],
)
def test_bad_finetune_params_are_one_line(finetune: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as caught:
        parse_params({"finetune": finetune})
    assert str(caught.value).startswith(f"params.yaml: {expected}")
    assert "{" not in str(caught.value)  # never the whole section as "got ..."
