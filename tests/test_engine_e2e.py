"""End to end, with real `dvc` commands in a temporary git repo holding a copy of the project:
a train stage SIGKILLed mid-run resumes under `dvc repro` to the same bytes and the same MLflow
run; `dvc exp run -S train.nproc=2` trains with two gloo processes through torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import commit_all, run_command, set_params

# A small transformer with every state a resume must restore: dropout, a cosine schedule with
# warmup, early stopping; a checkpoint every 2 epochs. 30 epochs leave the stage's MLflow worker
# time to open its run before the kill on a busy machine (12 did not); the two-process test,
# which kills nothing, trains 12, in batches of 128 at lr 0.003 (half the steps of 64 at 0.001,
# and so half the collectives of the two ranks, for the same accuracy: 0.82 on one process).
EPOCHS = 30
DDP_EPOCHS = 12
DDP_TRAIN = {"epochs": DDP_EPOCHS, "batch_size": 128, "lr": 0.003}
ENGINE_PARAMS = {
    "model": {"arch": "transformer", "dropout": 0.1},
    "train": {
        "epochs": EPOCHS,
        "patience": 5,
        "checkpoint_every": 2,
        "schedule": "cosine",
        "warmup_epochs": 2,
        "device": "cpu",
    },
}
TIMEOUT = 300

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return run_command(cmd, cwd, env, timeout=TIMEOUT)


@pytest.fixture
def env(pipeline_env: dict) -> dict:
    return pipeline_env


@pytest.fixture
def repo(pipeline_repo: Path, pipeline_env: dict) -> Path:
    """A private copy of the default pipeline's repo (splits and all), with the engine params."""
    set_params(pipeline_repo, **ENGINE_PARAMS)
    commit_all(pipeline_repo, pipeline_env, "engine params")
    return pipeline_repo


def weights(repo: Path) -> bytes:
    return (repo / "models/base/model.safetensors").read_bytes()


def train_runs(repo: Path) -> list:
    """The train runs of the engine params (the copied store also holds the default run's)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    return [r for r in runs if r.data.params.get("model.arch") == "transformer"]


def running_runs(repo: Path) -> list[str]:
    """The names of the runs in the repo's store that are still RUNNING."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_name for r in client.search_runs(ids, "attributes.status = 'RUNNING'")]


def kill_when_checkpointed(repo: Path, env: dict) -> str:
    """Start `dvc repro train`, SIGKILL its whole process group once a checkpoint is on disk
    and the stage's MLflow run is in the store (its worker process opens it while training
    starts: on a busy machine, after the first checkpoint); return what it printed."""
    checkpoint = repo / ".checkpoints/train/checkpoint.pt"
    process = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # The tracking worker logs in the background: on a busy machine the stage may checkpoint
    # before its run is in the store. Kill once it is, as a real kill mid-run finds it.
    while not train_runs(repo) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)  # reaps dvc: its locks then count as stale
    assert checkpoint.exists(), output
    return output


def test_killed_train_resumes_to_the_same_bytes_and_mlflow_run(repo: Path, env: dict) -> None:
    killed = kill_when_checkpointed(repo, env)
    assert f"train: epoch 2/{EPOCHS} " in killed
    assert "train: transformer of" not in killed  # it never finished
    assert not (repo / "models/base/model.safetensors").exists()
    [killed_run] = train_runs(repo)

    resumed = run(["dvc", "repro", "train"], repo, env).stdout
    assert "Running stage 'train'" in resumed
    epochs = [line for line in resumed.splitlines() if line.startswith("train: resuming from")]
    assert len(epochs) == 1, resumed
    done = int(epochs[0].split()[4])
    assert 2 <= done < EPOCHS
    assert f"train: epoch {done + 1}/{EPOCHS} " in resumed
    assert f"train: epoch {done}/{EPOCHS} " not in resumed  # nothing before the checkpoint reran
    assert not (repo / ".checkpoints/train").exists()
    [run_after] = train_runs(repo)  # the resumed stage continued the killed run
    assert run_after.info.run_id == killed_run.info.run_id
    assert run_after.info.status == "FINISHED"
    assert "best_val_accuracy" in run_after.data.metrics
    # Nothing is left RUNNING: the killed execution's parent, whose worker died with it, ends.
    assert running_runs(repo) == []
    resumed_weights = weights(repo)

    # The same stage, uninterrupted (forced: DVC would otherwise restore its cached output).
    fresh = run(["dvc", "repro", "-f", "-s", "train"], repo, env).stdout
    assert "resuming" not in fresh and f"train: epoch 1/{EPOCHS} " in fresh
    assert weights(repo) == resumed_weights
    assert len(train_runs(repo)) == 2


def test_exp_run_with_two_processes(repo: Path, env: dict) -> None:
    """`dvc exp run -S train.nproc=2`: torchrun starts 2 gloo workers; rank 0 alone saves and
    logs; it trains like one process does (the same batches, each split across the ranks).
    Then the stage again with `train.parallel: fsdp`: the parameters sharded across the two
    ranks with fully_shard, the same model in models/base, saved whole by rank 0."""
    import pandas as pd
    import torch

    from stages.core.engine.inference import predict
    from stages.core.modeling.model import load_model

    test = pd.read_parquet(repo / "data/splits/base_test.parquet")

    def trained() -> tuple[pd.DataFrame, torch.Tensor, float]:
        model, config = load_model(repo / "models/base")
        x = torch.tensor(test[config.feature_names].to_numpy(), dtype=torch.float32)
        predicted = predict(model, x)
        labels = torch.tensor([config.classes.index(label) for label in test["label"]])
        accuracy = (predicted == labels).float().mean().item()
        return pd.read_csv(repo / "plots/train.csv"), predicted, accuracy

    # The single-process reference: the stage run by hand (no second `dvc exp run`, no MLflow)
    set_params(repo, model={"dropout": 0.0}, train={"nproc": 1, **DDP_TRAIN})
    run([sys.executable, "-m", "stages.train"], repo, env | {"PIPELINE_TRACKING": "off"})
    single_curve, single_predictions, _ = trained()
    runs_before = len(train_runs(repo))

    two = ["-S", "train.nproc=2", "-S", "model.dropout=0"]
    output = run(["dvc", "exp", "run", *two, "train"], repo, env).stdout
    assert "train: 2 process(es) x 1 node(s) through torchrun" in output
    assert output.count("train: transformer of 18,218 parameters on 2 process(es)") == 1
    assert output.count(f"train: epoch 1/{DDP_EPOCHS} ") == 1  # rank 0 alone reports
    assert len(train_runs(repo)) == runs_before + 1  # and alone logs
    assert sorted(p.name for p in (repo / "models/base").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    curve, predictions, accuracy = trained()
    assert accuracy > 0.6  # ten classes: chance is 0.1
    # Same batches, summed in another order: the curves agree to float noise, not exactly.
    assert list(curve.epoch) == list(single_curve.epoch)
    for column in ("train_loss", "val_loss", "val_accuracy"):
        assert (curve[column] - single_curve[column]).abs().max() < 2e-3, column
    assert (predictions == single_predictions).float().mean().item() >= 0.98
    ddp_weights, ddp_curve = weights(repo), curve

    set_params(repo, model={"dropout": 0.0}, train={"nproc": 2, "parallel": "fsdp"})
    sharded = run([sys.executable, "-m", "stages.train"], repo, env | {"PIPELINE_TRACKING": "off"})
    assert "train: 2 process(es) x 1 node(s) through torchrun" in sharded.stdout
    assert sharded.stdout.count("train: transformer of 18,218 parameters on 2 process(es)") == 1
    assert sorted(p.name for p in (repo / "models/base").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    fsdp_curve, fsdp_predictions, _ = trained()
    for column in ("train_loss", "val_loss", "val_accuracy"):
        assert (fsdp_curve[column] - ddp_curve[column]).abs().max() < 1e-4, column
    assert (fsdp_predictions == predictions).float().mean().item() >= 0.99
    # The same weights: FSDP's reduce-scatter averages the same two ranks' gradients as DDP's
    # all-reduce. (They came out byte-identical here, torch 2.13 on this CPU; Adam on padded
    # shards and kernels on gathered copies may round otherwise elsewhere, hence a tolerance.)
    from safetensors.torch import load

    fsdp_state, ddp_state = load(weights(repo)), load(ddp_weights)
    assert fsdp_state.keys() == ddp_state.keys()
    for name, tensor in fsdp_state.items():
        torch.testing.assert_close(tensor, ddp_state[name], rtol=0, atol=1e-6, msg=name)
