"""Tracking: where the MLflow store is, and what a stage run logs (real SQLite store)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_EXPERIMENT

from stages.core.common.errors import DataError, TrackingError
from stages.core.engine.loop_state import EpochStats
from stages.core.tracking.recorder import flatten
from stages.core.tracking.runs import stage_run
from stages.core.tracking.store import ensure_experiment, redact, repo_root, tracking_uri

SECTIONS = {
    "train": {"lr": 0.01, "epochs": 3, "patience": None, "device": "auto"},
    "model": {"hidden": [128, 64], "dropout": 0.0},
}
# SECTIONS as MLflow params, written out by hand.
LOGGED_PARAMS = {
    "train.lr": "0.01",
    "train.epochs": "3",
    "train.patience": "null",
    "train.device": "auto",
    "model.hidden": "[128, 64]",
    "model.dropout": "0.0",
}


def test_flatten() -> None:
    tree = {"a": 1, "b": {"c": 2, "d": {"e": None}}, "f": [1, 2]}
    assert flatten(tree) == {"a": 1, "b.c": 2, "b.d.e": None, "f": [1, 2]}
    assert flatten({"lr": 0.1}, prefix="train.") == {"train.lr": 0.1}
    assert flatten({}) == {}


def test_repo_root_from_dvc_root(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo" / ".." / "repo"))
    assert repo_root() == (tmp_path / "repo").resolve()


def test_repo_root_is_the_nearest_parent_with_dvc(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert repo_root() == tmp_path.resolve()


def test_repo_root_falls_back_to_cwd(tmp_path: Path) -> None:
    assert not any((p / ".dvc").is_dir() for p in (tmp_path, *tmp_path.parents))
    assert repo_root() == tmp_path.resolve()


def test_tracking_uri(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    assert tracking_uri() == "sqlite:////somewhere/else.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri().startswith("sqlite:////")  # absolute: queued experiments share it


def test_stage_run_logs_flattened_params_and_tags(mlflow_client) -> None:
    with stage_run("train", TEST_EXPERIMENT, SECTIONS) as run:
        pass
    logged = mlflow_client.get_run(run.id)
    assert logged.data.params == LOGGED_PARAMS
    assert logged.data.tags["stage"] == "train"
    assert logged.data.tags["mlflow.runName"] == "train"
    assert "dvc_exp_name" not in logged.data.tags
    assert logged.info.status == "FINISHED"
    experiment = mlflow_client.get_experiment(logged.info.experiment_id)
    assert experiment.name == TEST_EXPERIMENT


def test_stage_run_tags_the_dvc_experiment(monkeypatch, mlflow_client) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    with stage_run("evaluate", TEST_EXPERIMENT, {}) as run:
        pass
    assert mlflow_client.get_run(run.id).data.tags["dvc_exp_name"] == "lucky-lark"


def test_runs_table_compares_params(mlflow_client) -> None:
    marker = uuid.uuid4().hex
    with stage_run("split", TEST_EXPERIMENT, {"split": {"seed": 3, "marker": marker}}) as run:
        run.log_metrics({"rows_base_train": 84})
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[TEST_EXPERIMENT], filter_string=f"params.`split.marker` = '{marker}'"
    )
    assert runs["run_id"].tolist() == [run.id]
    assert runs.loc[0, "params.split.seed"] == "3"
    assert runs.loc[0, "metrics.rows_base_train"] == 84
    assert runs.loc[0, "tags.stage"] == "split"


def test_log_metrics_flattens_and_keeps_numbers_only(mlflow_client) -> None:
    report = {
        "rows_in": 72,
        "quarantine_fraction": 0.25,
        "checks": {"not_null": {"success": False, "failed_rows": 3}},
        "failures": ["validate.max_quarantine_fraction: ..."],
        "stopped_early": True,
        "note": "text",
        "base": {"accuracy": 0.97, "f1_macro": 0.96},
    }
    with stage_run("validate", TEST_EXPERIMENT, {}) as run:
        run.log_metrics(report)
    assert mlflow_client.get_run(run.id).data.metrics == {
        "rows_in": 72.0,
        "quarantine_fraction": 0.25,
        "checks.not_null.failed_rows": 3.0,
        "base.accuracy": 0.97,
        "base.f1_macro": 0.96,
    }


def test_log_metrics_keeps_numpy_numbers(mlflow_client) -> None:
    with stage_run("ingest", TEST_EXPERIMENT, {}) as run:
        run.log_metrics({"rows": np.int64(1797), "loss": np.float32(0.5)})
    assert mlflow_client.get_run(run.id).data.metrics == {"rows": 1797.0, "loss": 0.5}


@pytest.mark.parametrize(
    ("every_s", "steps_per_call"),
    [(0.0, [[1], [2], [0], [3]]), (60.0, [[1, 2], [0], [3]])],
    ids=["slow-epochs-each-written-when-sent", "fast-epochs-share-a-write"],
)
def test_log_epoch_writes_epochs_in_order_and_merges_fast_ones(
    monkeypatch, mlflow_client, every_s: float, steps_per_call: list
) -> None:
    """Inline logging holds the run's own metrics for up to ``INLINE_METRICS_EVERY_S``: epochs
    longer than that are each written when sent; quicker ones share a write, which anything
    else the stage sends (here a final metric) first flushes, so the order holds."""
    from mlflow import MlflowClient

    from stages.core.tracking import runs

    calls = []
    real = MlflowClient.log_batch

    def spy(self, run_id, metrics=(), **kwargs):
        calls.append([(m.key, m.value, m.step) for m in metrics])
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    monkeypatch.setattr(runs, "INLINE_METRICS_EVERY_S", every_s)
    history = [EpochStats(e, 1.0 / e, 2.0 / e, 0.5 + e / 10) for e in (1, 2, 3)]
    with stage_run("train", TEST_EXPERIMENT, {}) as run:
        calls.clear()  # the params
        run.log_epoch(history[0])
        run.log_epoch(history[1])
        run.log_metrics({"wall_time_s": 1.5}, parent=True)  # not the run's own: no merging
        run.log_epoch(history[2])
    assert [sorted({step for *_, step in call}) for call in calls] == steps_per_call
    assert sorted(m for m in calls[0] if m[2] == 1) == [
        ("train_loss", 1.0, 1),
        ("val_accuracy", 0.6, 1),
        ("val_loss", 2.0, 1),
    ]
    val_loss = mlflow_client.get_metric_history(run.id, "val_loss")
    assert [(m.step, m.value) for m in val_loss] == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert "epoch" not in mlflow_client.get_run(run.id).data.metrics


def test_an_epoch_a_checkpoint_saves_is_written_at_once(monkeypatch, mlflow_client) -> None:
    """Inline, epochs may wait to share a write; but not past a resume checkpoint: a stage
    killed after the save resumes after that epoch and never logs the earlier ones again."""
    from types import SimpleNamespace

    from stages.core.tracking import runs

    monkeypatch.setattr(runs, "INLINE_METRICS_EVERY_S", 60.0)
    every_second_epoch = SimpleNamespace(due=lambda epoch: epoch % 2 == 0)
    history = [EpochStats(e, 1.0 / e, 2.0 / e, 0.5 + e / 10) for e in (1, 2, 3)]
    written = []
    with stage_run("train", TEST_EXPERIMENT, {}) as run:
        run_id, on_epoch = run.id, run.epoch_logger(every_second_epoch)  # (asking flushes)
        for stats in history:
            on_epoch(stats)
            steps = mlflow_client.get_metric_history(run_id, "val_loss")
            written.append([m.step for m in steps])
    assert written == [[], [1, 2], [1, 2]]  # epoch 3 waits for the run's end
    steps = mlflow_client.get_metric_history(run.id, "val_loss")
    assert [m.step for m in steps] == [1, 2, 3]


def test_log_artifacts(tmp_path: Path, mlflow_client) -> None:
    model_dir = tmp_path / "models" / "base"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}\n")
    (model_dir / "model.safetensors").write_bytes(b"weights")
    plot = tmp_path / "plots" / "train.csv"
    plot.parent.mkdir()
    plot.write_text("epoch,loss\n1,0.5\n")
    with stage_run("train", TEST_EXPERIMENT, {}) as run:
        run.log_artifacts(model_dir, plot, tmp_path / "absent.json")
        run.log_artifacts(plot, folder="extra")
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.id)}
    assert artifacts == {"base", "train.csv", "extra"}
    in_model = {a.path for a in mlflow_client.list_artifacts(run.id, "base")}
    assert in_model == {"base/config.json", "base/model.safetensors"}
    local = mlflow_client.download_artifacts(run.id, "base/model.safetensors", str(tmp_path))
    assert Path(local).read_bytes() == b"weights"


def test_failed_stage_marks_the_run_failed(mlflow_client) -> None:
    with (
        pytest.raises(DataError, match="bad rows"),
        stage_run("validate", TEST_EXPERIMENT, {}) as r,
    ):
        run_id = r.id
        raise DataError("bad rows")
    assert mlflow_client.get_run(run_id).info.status == "FAILED"
    import mlflow

    assert mlflow.active_run() is None


def test_ensure_experiment_is_idempotent(mlflow_client) -> None:
    name = f"exp-{uuid.uuid4().hex[:8]}"
    first = ensure_experiment(name)
    assert ensure_experiment(name) == first
    assert mlflow_client.get_experiment(first).name == name


def _default_store(monkeypatch, mlflow_dir: Path) -> None:
    """No MLFLOW_TRACKING_URI: the store at the repo root (the session store's directory)."""
    import mlflow

    mlflow.set_tracking_uri(None)  # forget the URI an earlier test set in this process
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(mlflow_dir))


def test_default_store_keeps_artifacts_beside_it(monkeypatch, mlflow_dir, mlflow_client) -> None:
    _default_store(monkeypatch, mlflow_dir)
    experiment_id = ensure_experiment(f"local-{uuid.uuid4().hex[:8]}")
    experiment = mlflow_client.get_experiment(experiment_id)
    assert experiment.artifact_location == (mlflow_dir.resolve() / "mlartifacts").as_uri()


def test_every_new_experiment_keeps_artifacts_beside_the_local_store(
    monkeypatch, mlflow_dir, mlflow_client
) -> None:
    _default_store(monkeypatch, mlflow_dir)
    ensure_experiment(f"local-{uuid.uuid4().hex[:8]}")
    second = mlflow_client.get_experiment(ensure_experiment(f"local-{uuid.uuid4().hex[:8]}"))
    assert second.artifact_location == (mlflow_dir.resolve() / "mlartifacts").as_uri()


# --- The background worker: what a fresh stage process uses ------------------------------------


def test_worker_records_what_inline_logging_records(tmp_path: Path, mlflow_client) -> None:
    plot = tmp_path / "train.csv"
    plot.write_text("epoch,loss\n1,0.5\n")
    history = [EpochStats(e, 1.0 / e, 2.0 / e, 0.5 + e / 10) for e in range(1, 31)]
    runs = {}
    for background in (True, False):
        with stage_run("train", TEST_EXPERIMENT, SECTIONS, background=background) as run:
            for stats in history:
                run.log_epoch(stats)
            run.log_metrics({"best": {"val_accuracy": 0.9}, "note": "text"})
            run.log_artifacts(plot)
        runs[background] = mlflow_client.get_run(run.id)
    worker, inline = runs[True], runs[False]
    assert worker.info.run_id != inline.info.run_id
    assert worker.data.params == inline.data.params == LOGGED_PARAMS
    assert worker.data.metrics == inline.data.metrics
    assert worker.data.metrics["best.val_accuracy"] == 0.9
    assert worker.info.status == "FINISHED"
    steps = mlflow_client.get_metric_history(worker.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in steps] == [(s.epoch, s.val_loss) for s in history]
    assert [a.path for a in mlflow_client.list_artifacts(worker.info.run_id)] == ["train.csv"]


def test_worker_marks_a_failed_stage_failed(mlflow_client) -> None:
    with (
        pytest.raises(DataError, match="bad rows"),
        stage_run("validate", TEST_EXPERIMENT, {}, background=True) as run,
    ):
        run_id = run.id
        raise DataError("bad rows")
    assert mlflow_client.get_run(run_id).info.status == "FAILED"


def test_worker_marks_the_run_killed_when_the_stage_dies(mlflow_uri: str, mlflow_client) -> None:
    """SIGKILL of the stage: the worker sees its pipe close and ends the run as KILLED."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    script = (
        "import os, signal\n"
        "from stages.core.tracking.runs import stage_run\n"
        f"with stage_run('train', {TEST_EXPERIMENT!r}, {{}}, background=True) as run:\n"
        "    print(run.id, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL
    run_id = done.stdout.strip()
    deadline = time.monotonic() + 60
    while mlflow_client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mlflow_client.get_run(run_id).info.status == "KILLED"


def test_unreachable_server_is_one_line_naming_it(monkeypatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with (
        pytest.raises(TrackingError) as caught,
        stage_run("ingest", "nowhere", {}, background=True) as run,
    ):
        run.log_metrics({"rows": 1})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"tracking: {uri}: connection refused (is the server running?) ")
    assert "unset MLFLOW_TRACKING_URI" in message and "PIPELINE_TRACKING=off" in message


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:token@host/api", "https://***@host/api"),
        ("http://token@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("postgresql://u:p%40ss@db:5432/x", "postgresql://***@db:5432/x"),
        ("a http://u:p@h1 and https://v:q@h2/p", "a http://***@h1 and https://***@h2/p"),
        ("tracking: https://u:tok@h: refused", "tracking: https://***@h: refused"),
        ("https://host:5000/path", "https://host:5000/path"),
        ("sqlite:////data/at@home/mlflow.db", "sqlite:////data/at@home/mlflow.db"),
        ("http://host/run?user=a@b", "http://host/run?user=a@b"),
        ("write to a@b.example", "write to a@b.example"),
    ],
)
def test_redact_hides_the_user_info_of_uris(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_unreachable_server_with_credentials_keeps_them_out_of_the_line(monkeypatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{port}")
    with (
        pytest.raises(TrackingError) as caught,
        stage_run("ingest", "nowhere", {}, background=True) as run,
    ):
        run.log_metrics({"rows": 1})
    message = str(caught.value)
    assert message.startswith(f"tracking: http://***@127.0.0.1:{port}: connection refused ")
    assert "s3cret" not in message and "user" not in message


def test_a_url_param_is_logged_without_its_token(mlflow_client) -> None:
    source = {"data": {"source": "https://me:tok3n@example.org/rows.csv"}}
    with stage_run("ingest", TEST_EXPERIMENT, source) as run:
        pass
    params = mlflow_client.get_run(run.id).data.params
    assert params == {"data.source": "https://***@example.org/rows.csv"}


# --- The parent run of a DVC execution --------------------------------------------------------


def under_dvc(
    tmp_path: Path, script: str, mlflow_uri: str, extra_env: dict | None = None, **kwargs
) -> subprocess.Popen:
    """Run ``script`` in a Python process whose parent is a program named ``dvc`` (a stand-in
    for `dvc repro`, found the way execution_key finds DVC: by its command line), in
    ``tmp_path``; one execution per call."""
    from conftest import REPO_ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    dvc = bin_dir / "dvc"
    dvc.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)\n"
    )
    dvc.chmod(0o755)
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO_ROOT)}
    env |= extra_env or {}
    return subprocess.Popen(
        [str(dvc), script], cwd=tmp_path, env=env, text=True, start_new_session=True, **kwargs
    )


def parent_of(client, run_id: str):
    return client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])


def test_the_parent_records_the_params_it_is_given(tmp_path, mlflow_uri, mlflow_client) -> None:
    """Every param the stage passes lands on the execution's parent; tracking reads no
    params.yaml (the one here says otherwise)."""
    (tmp_path / "params.yaml").write_text("train:\n  lr: 999\n")
    script = (
        "from stages.core.tracking.runs import stage_run\n"
        f"every = {{**{SECTIONS!r}, 'split': {{'seed': 7}}}}\n"
        f"with stage_run('train', {TEST_EXPERIMENT!r}, {{}}, pipeline_params=every) as run:\n"
        "    print(run.id, flush=True)\n"
    )
    done = under_dvc(tmp_path, script, mlflow_uri, stdout=subprocess.PIPE)
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 0
    parent = parent_of(mlflow_client, out.split()[-1])
    assert parent.data.tags["pipeline.role"] == "parent"
    assert parent.data.params == LOGGED_PARAMS | {"split.seed": "7"}
    assert parent.info.status == "FINISHED"


def test_a_killed_and_resumed_stage_leaves_no_run_running(
    tmp_path, mlflow_uri, mlflow_client
) -> None:
    """An execution SIGKILLed with its stage (and the stage's tracking): the next execution
    resumes the stage's run under its own parent, and the killed execution's parent ends
    KILLED instead of staying RUNNING."""
    import signal

    key = uuid.uuid4().hex

    def script(resuming: bool) -> str:
        return (
            "import os, signal\n"
            "from stages.core.tracking.runs import stage_run\n"
            f"with stage_run('train', {TEST_EXPERIMENT!r}, {{}}, {key!r}, {resuming}) as run:\n"
            "    print(run.id, flush=True)\n"
        )

    # The stage, its tracking worker and dvc die at once (`kill -9` of the process group). A
    # worker forked by the warm server is in no such group (it would end the runs itself):
    # this is the plain worker's case.
    killed_script = script(resuming=False) + "    os.killpg(0, signal.SIGKILL)\n"
    plain = {"PIPELINE_WARM_SERVER": "off"}
    killed = under_dvc(tmp_path, killed_script, mlflow_uri, plain, stdout=subprocess.PIPE)
    out, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    run_id = out.split()[-1]
    first_parent = parent_of(mlflow_client, run_id)
    assert first_parent.info.status == "RUNNING"  # nothing was left to end it

    resumed = under_dvc(tmp_path, script(resuming=True), mlflow_uri, stdout=subprocess.PIPE)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    assert out.split()[-1] == run_id  # the killed run continued
    run = mlflow_client.get_run(run_id)
    second_parent = parent_of(mlflow_client, run_id)
    assert second_parent.info.run_id != first_parent.info.run_id
    assert second_parent.data.tags["run.train"] == run_id
    first_parent = mlflow_client.get_run(first_parent.info.run_id)
    statuses = {r.info.run_id: r.info.status for r in (run, first_parent, second_parent)}
    assert statuses == {
        run_id: "FINISHED",
        first_parent.info.run_id: "KILLED",
        second_parent.info.run_id: "FINISHED",
    }
    assert first_parent.info.end_time is not None
