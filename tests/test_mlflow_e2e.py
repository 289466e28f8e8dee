"""MLflow after real `dvc` runs: one parent per execution with its stage runs as children,
what the parent holds, lineage of cached stages, datasets, models, the registry, queued
experiments, a real tracking server, serving, and a server that is down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    LEAN_EVALUATE,
    PIPELINE_STAGES,
    REPO_ROOT,
    commit_all,
    new_store,
    ran_stages,
    run_command,
    run_queued_experiments,
    set_params,
)

from stages.core.tracking.recorder import flatten

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
EXPERIMENT = "finetune-pipeline"
MODEL = "digits-classifier"


def client_for(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def parents(client) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id],
        "tags.`pipeline.role` = 'parent'",
        order_by=["attributes.start_time ASC"],
    )


def children(client, parent) -> dict:
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {run.data.tags["stage"]: run for run in runs}


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def features_of(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["label", "domain"])


def test_one_parent_per_execution_with_every_stage_as_child(pristine_repo: Path) -> None:
    client = client_for(pristine_repo)
    (parent,) = parents(client)
    runs = children(client, parent)
    assert sorted(runs) == sorted(PIPELINE_STAGES)
    assert all(run.info.status == "FINISHED" for run in [parent, *runs.values()])
    commit = run_command(["git", "rev-parse", "HEAD~1"], pristine_repo, os.environ).stdout
    assert parent.info.run_name == f"workspace@{commit[:7]}"
    tags = parent.data.tags
    assert tags["git.commit"] == commit.strip() and tags["git.dirty"] == "false"
    assert {tags[f"run.{stage}"] for stage in PIPELINE_STAGES} == {
        run.info.run_id for run in runs.values()
    }
    assert not [key for key in tags if key.startswith("cached.")]


def test_parent_holds_every_param_the_data_md5s_and_the_final_metrics(pristine_repo: Path) -> None:
    client = client_for(pristine_repo)
    (parent,) = parents(client)
    written = flatten(yaml.safe_load((pristine_repo / "params.yaml").read_text()))
    for key, value in written.items():
        # Logged as text of the typed value (`30.0` for a float param written `30`).
        assert yaml.safe_load(parent.data.params[key]) == value, key
    recorded = {
        dep["path"]: dep["md5"]
        for stage in lock(pristine_repo).values()
        for dep in stage["deps"]
        if not dep["path"].endswith(".py")
    }
    md5s = {k.removeprefix("dvc.md5."): v for k, v in parent.data.tags.items() if "dvc.md5." in k}
    assert md5s["data/source"] == recorded["data/source"]
    assert md5s["data/splits"] == recorded["data/splits"]
    assert md5s["models/finetuned"] == recorded["models/finetuned"]
    metrics = json.loads((pristine_repo / "metrics/evaluate.json").read_text())
    assert parent.data.metrics["finetuned.accuracy"] == metrics["finetuned"]["accuracy"]
    assert parent.data.metrics["transfer.gain_mean"] == metrics["transfer"]["gain_mean"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"params.yaml", "dvc.lock", "evaluation.md", "validation.json"} <= artifacts


def test_stage_runs_record_their_outputs_md5_as_dvc_does(pristine_repo: Path) -> None:
    client = client_for(pristine_repo)
    runs = children(client, parents(client)[0])
    for stage, entry in lock(pristine_repo).items():
        for out in entry["outs"]:
            assert runs[stage].data.tags[f"dvc.out.{out['path']}"] == out["md5"], out["path"]


def test_datasets_carry_dvc_md5_digests_and_their_role(pristine_repo: Path) -> None:
    """The digests are checked against DVC's own manifest of data/splits in its cache."""
    client = client_for(pristine_repo)
    runs = children(client, parents(client)[0])
    splits_md5 = next(o["md5"] for o in lock(pristine_repo)["split"]["outs"])
    manifest = pristine_repo / ".dvc/cache/files/md5" / splits_md5[:2] / splits_md5[2:]
    by_file = {
        e["relpath"].removesuffix(".parquet"): e["md5"] for e in json.loads(manifest.read_text())
    }
    expected = {
        "train": {("base_train", "training"), ("base_val", "validation")},
        "finetune": {("target_train", "training"), ("target_val", "validation")},
        "evaluate": {("base_test", "test"), ("target_test", "test")},
    }
    for stage, inputs in expected.items():
        logged = runs[stage].inputs.dataset_inputs
        contexts = {
            (d.dataset.name, tag.value)
            for d in logged
            for tag in d.tags
            if tag.key == "mlflow.data.context"
        }
        assert inputs <= contexts
        # Every dataset on the run (MLflow's own evaluation included) has DVC's digest.
        for d in logged:
            assert d.dataset.digest == by_file[d.dataset.name], d.dataset.name


def test_logged_models_reproduce_the_pipeline_figures(pristine_repo: Path) -> None:
    """The base model from the train run and the champion from the registry, loaded with
    mlflow.pyfunc, score what evaluate computed with its own code."""
    import mlflow.pyfunc

    client = client_for(pristine_repo)
    runs = children(client, parents(client)[0])
    metrics = json.loads((pristine_repo / "metrics/evaluate.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{pristine_repo / 'mlflow.db'}")
    try:
        base = mlflow.pyfunc.load_model(runs["train"].data.tags["model_uri"])
        test = pd.read_parquet(pristine_repo / "data/splits/base_test.parquet")
        accuracy = (base.predict(features_of(test)).to_numpy() == test["label"]).mean()
        assert round(accuracy, 6) == metrics["base"]["accuracy"]

        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.version == 1 and champion.run_id == runs["finetune"].info.run_id
        assert champion.tags["gates"] == "passed"
        assert champion.tags["parent_run_id"] == parents(client)[0].info.run_id
        tuned = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        target = pd.read_parquet(pristine_repo / "data/splits/target_test.parquet")
        accuracy = (tuned.predict(features_of(target)).to_numpy() == target["label"]).mean()
        assert round(accuracy, 6) == metrics["finetuned"]["accuracy"]
    finally:
        mlflow.set_tracking_uri(None)


def test_an_experiment_names_the_runs_behind_its_cached_stages(
    finetune_experiment, pipeline_env: dict
) -> None:
    repo = finetune_experiment.repo
    client = client_for(repo)
    first, second = parents(client)
    first_runs = children(client, first)
    name = second.data.tags["dvc_exp_name"]
    head = run_command(["git", "rev-parse", "HEAD"], repo, pipeline_env).stdout.strip()
    assert second.data.tags["git.commit"] == head  # the experiment's baseline
    assert second.info.run_name == f"{name}@{head[:7]}"
    assert second.data.params["finetune.lr"] == "0.005"
    assert sorted(children(client, second)) == ["evaluate", "finetune"]
    for stage in ("ingest", "validate", "split", "train"):
        assert second.data.tags[f"cached.{stage}"] == first_runs[stage].info.run_id
    before = finetune_experiment.before["evaluate"]["finetuned"]["accuracy"]
    after = json.loads((repo / "metrics/evaluate.json").read_text())["finetuned"]["accuracy"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    candidate = client.get_model_version_by_alias(MODEL, "candidate")
    assert candidate.version == 2
    assert champion.version == (2 if after > before else 1)
    assert ("and champion" in finetune_experiment.output) == (after > before)


def test_queued_experiments_each_get_a_parent(pipeline_repo: Path, pipeline_env: dict) -> None:
    """Two experiments at once through `dvc queue start -j 2`: two parents with their own params
    in the repo's own store, no locking errors, no stray store in DVC's temporary copies, and
    each registers the model of the finetune run behind its outputs (the execution's own or,
    when DVC skipped finetune, the earlier one), though it runs in a copy of the repo."""
    # 200 bootstrap resamples and 2 draws: the intervals are not what this test checks
    set_params(pipeline_repo, evaluate={"bootstrap_resamples": 200, "draws": 2})
    commit_all(pipeline_repo, pipeline_env, "fewer resamples and draws")
    settings = ["evaluate.draws=1", "finetune.lr=0.005"]  # evaluate alone; finetune, evaluate
    status = run_queued_experiments(pipeline_repo, pipeline_env, settings)
    assert status.count("Success") == 2, status
    logs = "".join(
        run_command(["dvc", "queue", "logs", line.split()[1]], pipeline_repo, pipeline_env).stdout
        for line in status.splitlines()
        if "Success" in line
    )
    assert "database is locked" not in logs and "migration" not in logs.lower()
    assert not list((pipeline_repo / ".dvc/tmp").rglob("*.db"))
    client = client_for(pipeline_repo)
    first, *queued = parents(client)
    assert sorted(p.data.params["evaluate.draws"] for p in queued) == ["1", "2"]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    by_parent = {v.tags.get("parent_run_id"): v for v in versions}
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    for parent in queued:
        stages = children(client, parent)
        tuned = parent.data.params["finetune.lr"] == "0.005"
        assert sorted(stages) == (["evaluate", "finetune"] if tuned else ["evaluate"])
        assert parent.data.metrics["transfer.draws"] == float(parent.data.params["evaluate.draws"])
        version = by_parent[parent.info.run_id]  # registered in the repo's store
        producer = stages["finetune"] if tuned else children(client, first)["finetune"]
        assert version.run_id == producer.info.run_id  # not a copy logged again by evaluate


def test_a_stage_run_by_hand_logs_a_standalone_run(pipeline_repo: Path, pipeline_env) -> None:
    run_command([sys.executable, "-m", "stages.split"], pipeline_repo, pipeline_env)
    client = client_for(pipeline_repo)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (split,) = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'split'", order_by=["attributes.start_time DESC"]
    )[:1]
    assert "mlflow.parentRunId" not in split.data.tags
    assert split.data.params["split.seed"] == "42"
    assert len(parents(client)) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: the server exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_tracking_server_and_registry(
    pipeline_repo: Path, pipeline_env: dict, tmp_path: Path, empty_store: Path
) -> None:
    """The pipeline logs to a real `mlflow server` (SQLite backend, proxied artifacts), and the
    champion read back from it predicts. (`mlflow models serve` answers for the champion of a
    fresh clone's store below, and for one of the team stack's server in test_team_e2e.py.)"""
    import mlflow.pyfunc
    from mlflow import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    server = start(
        [
            str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", new_store(empty_store, tmp_path, "server.db"),
            "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1",
        ],
        # Without the GenAI job runner, as `make ui` and the team stack serve (about 8 fewer
        # processes to start).
        pipeline_env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        wait_for(f"{uri}/health", server)
        env = pipeline_env | {"MLFLOW_TRACKING_URI": uri}
        tune = ["dvc", "exp", "run", "-S", "finetune.lr=0.003", *LEAN_EVALUATE]
        done = run_command(tune, pipeline_repo, env)
        assert f"registered {MODEL} version 1 as candidate and champion" in done.stdout
        client = MlflowClient(uri)
        (parent,) = parents(client)
        assert sorted(children(client, parent)) == ["evaluate", "finetune"]
        assert not (pipeline_repo / "mlruns").exists()
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.run_id == children(client, parent)["finetune"].info.run_id

        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        target = pd.read_parquet(pipeline_repo / "data/splits/target_test.parquet")
        predicted = model.predict(features_of(target))
        metrics = json.loads((pipeline_repo / "metrics/evaluate.json").read_text())
        accuracy = (predicted.to_numpy() == target["label"]).mean()
        assert round(accuracy, 6) == metrics["finetuned"]["accuracy"]
    finally:
        mlflow.set_tracking_uri(None)
        stop(server)


def serve_and_ask(
    model_uri: str, rows: pd.DataFrame, env: dict, log: Path, requests: tuple[dict, ...] = ({},)
) -> list[list]:
    """`mlflow models serve` of ``model_uri`` on a free port: its predictions for ``rows``, one
    list per request (each dict is a request's ``params``)."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    serve = start(
        [
            str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
        ],
        env,
        log,
    )  # fmt: skip
    answers = []
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", serve, seconds=180)
        for params in requests:
            body = {"dataframe_split": json.loads(rows.to_json(orient="split")), "params": params}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                answers.append(json.loads(response.read())["predictions"])
    finally:
        stop(serve)
    return answers


def as_labels(predictions: list) -> list:
    """Served labels as plain values (MLflow answers a labels column as ``{"label": ...}``)."""
    return [row["label"] if isinstance(row, dict) else row for row in predictions]


def test_first_make_pipeline_on_a_fresh_clone_fills_mlflow(
    pristine_repo: Path, pipeline_env: dict, tmp_path: Path
) -> None:
    """A newcomer's `make pipeline` on a fresh clone (committed outputs, no DVC cache, no store):
    DVC reruns ingest ... finetune and rightly skips evaluate, and MLflow still holds the
    execution's parent with the final metrics and a champion that loads and serves. Nothing in
    the clone changes, and a second `make pipeline` records nothing more."""
    import mlflow.pyfunc

    clone = tmp_path / "clone"
    run_command(["git", "clone", "-q", str(pristine_repo), str(clone)], tmp_path, pipeline_env)
    assert not (clone / "mlflow.db").exists() and not (clone / "models/finetuned").exists()
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy2(REPO_ROOT / name, clone / name)
    venv = Path(sys.executable).parent.parent
    # The README's first command, on this interpreter's venv (already set up: -o skips set-up).
    make = ["make", "pipeline", f"VENV={venv}", "-o", f"{venv}/.installed"]
    first = run_command(make, clone, pipeline_env)
    assert ran_stages(first.stdout) == PIPELINE_STAGES[:-1], first.stdout
    assert "Stage 'evaluate' didn't change, skipping" in first.stdout
    copied = [":!Makefile", ":!pyproject.toml", ":!requirements.lock"]
    status = run_command(["git", "status", "--porcelain", "--", ".", *copied], clone, pipeline_env)
    assert status.stdout == "", f"the first run changed committed files:\n{status.stdout}"

    client = client_for(clone)
    (parent,) = parents(client)
    metrics = json.loads((clone / "metrics/evaluate.json").read_text())
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["finetuned.accuracy"] == metrics["finetuned"]["accuracy"]
    assert parent.data.metrics["transfer.gain_mean"] == metrics["transfer"]["gain_mean"]
    assert "cached.evaluate" in parent.data.tags and "run.evaluate" not in parent.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"evaluation.md", "figures", "dvc.lock", "params.yaml"} <= artifacts
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == parent.data.tags["run.finetune"]
    assert champion.tags["gates"] == "passed"
    assert champion.tags["parent_run_id"] == parent.info.run_id

    target = pd.read_parquet(clone / "data/splits/target_test.parquet")
    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    try:
        predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
            features_of(target)
        )
    finally:
        mlflow.set_tracking_uri(None)
    accuracy = (predicted.to_numpy() == target["label"].to_numpy()).mean()
    assert round(accuracy, 6) == metrics["finetuned"]["accuracy"]
    env = pipeline_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}
    served, probabilities = serve_and_ask(
        f"models:/{MODEL}@champion", features_of(target).head(7), env, tmp_path / "serve.log",
        requests=({}, {"probabilities": True}),
    )  # fmt: skip
    assert as_labels(served) == predicted.head(7).tolist()
    # A row of probabilities keyed by class, the most likely class the label served above.
    assert [sorted(row, key=int) for row in probabilities] == [[str(c) for c in range(10)]] * 7
    assert [int(max(row, key=row.get)) for row in probabilities] == as_labels(served)

    again = run_command(make, clone, pipeline_env)
    assert ran_stages(again.stdout) == [] and "pipeline:" not in again.stdout
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1
    assert len(parents(client)) == 1


def test_a_stage_stops_in_one_line_when_the_server_is_down(
    pipeline_repo: Path, pipeline_env: dict
) -> None:
    """Refused connections: the stage fails with one line naming the URI (less the
    credentials in it) and how to run without the server, and DVC records nothing for it."""
    port = free_port()
    lock_before = (pipeline_repo / "dvc.lock").read_text()
    env = pipeline_env | {"MLFLOW_TRACKING_URI": f"http://user:s3cret@127.0.0.1:{port}"}
    failed = run_command(["dvc", "repro", "-f", "-s", "split"], pipeline_repo, env, check=False)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("split: error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr
    shown = f"http://***@127.0.0.1:{port}"
    assert errors[0].startswith(f"split: error: tracking: {shown}: connection refused ")
    assert "s3cret" not in failed.stderr + failed.stdout
    assert "PIPELINE_TRACKING=off" in errors[0]
    assert (pipeline_repo / "dvc.lock").read_text() == lock_before


def test_a_silent_server_stops_the_stage_too(pipeline_repo: Path, pipeline_env: dict) -> None:
    """A host that accepts connections and never answers: MLflow's bounded timeout and retry
    end the stage (in about 12 s with the defaults, benchmarks/tracking.py; a 1 s timeout
    here) instead of minutes of retries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = pipeline_env | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}
        failed = run_command(
            [sys.executable, "-m", "stages.split"], pipeline_repo, env, check=False, timeout=120
        )
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"split: error: tracking: {uri}: no answer (timed out) ")
    assert failed.stderr.count("\n") == 1
