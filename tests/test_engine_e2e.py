"""End to end, with real `dvc` commands in a temporary git repo holding a copy of the project:
a train stage SIGKILLed mid-run resumes under `dvc repro` to the same bytes and the same MLflow
run; `dvc exp run -S train.nproc=2` trains with two gloo processes through torchrun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "data/source", ".dvcignore", ".dvc/config"]
# A small transformer with every state a resume must restore: dropout, a cosine schedule with
# warmup, early stopping; a checkpoint every 2 epochs.
ENGINE_PARAMS = {
    "model": {"arch": "transformer", "dropout": 0.1},
    "train": {
        "epochs": 30,
        "patience": 5,
        "checkpoint_every": 2,
        "schedule": "cosine",
        "warmup_epochs": 2,
        "device": "cpu",
    },
}
TIMEOUT = 300

pytestmark = pytest.mark.e2e


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def env() -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment |= {"MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}
    return environment


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    """A git repo with the project, the engine params and the data splits (`dvc repro split`)."""
    repo = tmp_path_factory.mktemp("engine")
    for name in PROJECT_FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in ENGINE_PARAMS.items():
        params[section] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n__pycache__/\n.checkpoints/\n")
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "repro", "split"], repo, env)
    commit(repo, env, "project and splits")
    return repo


def commit(repo: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], repo, env)
    git_id = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", *git_id, "commit", "-qm", message], repo, env)


def weights(repo: Path) -> bytes:
    return (repo / "models/base/model.safetensors").read_bytes()


def train_runs(repo: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune-pipeline")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'train'")


def kill_when_checkpointed(repo: Path, env: dict) -> str:
    """Start `dvc repro train`, SIGKILL its whole process group once a checkpoint is on disk;
    return what it printed."""
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
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)  # reaps dvc: its locks then count as stale
    assert checkpoint.exists(), output
    return output


def test_killed_train_resumes_to_the_same_bytes_and_mlflow_run(repo: Path, env: dict) -> None:
    killed = kill_when_checkpointed(repo, env)
    assert "train: epoch 2/30 " in killed
    assert "train: transformer of" not in killed  # it never finished
    assert not (repo / "models/base/model.safetensors").exists()
    [killed_run] = train_runs(repo)

    resumed = run(["dvc", "repro", "train"], repo, env).stdout
    assert "Running stage 'train'" in resumed
    epochs = [line for line in resumed.splitlines() if line.startswith("train: resuming from")]
    assert len(epochs) == 1, resumed
    done = int(epochs[0].split()[4])
    assert 2 <= done < 30
    assert f"train: epoch {done + 1}/30 " in resumed
    assert f"train: epoch {done}/30 " not in resumed  # nothing before the checkpoint reran
    assert not (repo / ".checkpoints/train").exists()
    [run_after] = train_runs(repo)  # the resumed stage continued the killed run
    assert run_after.info.run_id == killed_run.info.run_id
    assert run_after.info.status == "FINISHED"
    assert "best_val_accuracy" in run_after.data.metrics
    resumed_weights = weights(repo)

    # The same stage, uninterrupted (forced: DVC would otherwise restore its cached output).
    fresh = run(["dvc", "repro", "-f", "-s", "train"], repo, env).stdout
    assert "resuming" not in fresh and "train: epoch 1/30 " in fresh
    assert weights(repo) == resumed_weights
    assert len(train_runs(repo)) == 2
    run(["git", "checkout", "--", "."], repo, env)


def test_exp_run_with_two_processes(repo: Path, env: dict) -> None:
    """`dvc exp run -S train.nproc=2`: torchrun starts 2 gloo workers; rank 0 alone saves and
    logs; it trains like one process does (the same batches, each split across the ranks)."""
    import pandas as pd
    import torch

    from stages.core.model import load_model
    from stages.core.training import predict

    test = pd.read_parquet(repo / "data/splits/base_test.parquet")

    def trained() -> tuple[pd.DataFrame, torch.Tensor, float]:
        model, config = load_model(repo / "models/base")
        x = torch.tensor(test[config.feature_names].to_numpy(), dtype=torch.float32)
        predicted = predict(model, x)
        labels = torch.tensor([config.classes.index(label) for label in test["label"]])
        accuracy = (predicted == labels).float().mean().item()
        return pd.read_csv(repo / "plots/train.csv"), predicted, accuracy

    one = ["-S", "train.nproc=1", "-S", "model.dropout=0"]
    run(["dvc", "exp", "run", *one, "train"], repo, env)
    single_curve, single_predictions, _ = trained()
    runs_before = len(train_runs(repo))

    two = ["-S", "train.nproc=2", "-S", "model.dropout=0"]
    output = run(["dvc", "exp", "run", *two, "train"], repo, env).stdout
    assert "train: 2 process(es) x 1 node(s) through torchrun" in output
    assert output.count("train: transformer of 18,218 parameters on 2 process(es)") == 1
    assert output.count("train: epoch 1/30 ") == 1  # rank 0 alone reports
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
