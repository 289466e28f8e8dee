"""Team scale, on real servers: a stack started by scripts/team.py (what `make team-up` runs:
PostgreSQL as the unprivileged postgres user, an MLflow server with proxied artifacts) on free
ports of 127.0.0.1, one per session; the real pipeline logging to it; queued experiments in
parallel; a DVC remote round trip; no secret anywhere; and the server dying mid-stage.

Skipped, with the reason, where PostgreSQL is not installed (`make test-team`, `.ci/run`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    PIPELINE_STAGES,
    REPO_ROOT,
    commit_all,
    copy_project,
    new_project_repo,
    ran_stages,
    run_command,
    run_queued_experiments,
    set_params,
)

from scripts import team

pytestmark = [pytest.mark.e2e, pytest.mark.team, pytest.mark.timeout(1200)]
EXPERIMENT = "finetune-pipeline"
MODEL = "digits-classifier"
TEAM_SCRIPT = [sys.executable, str(REPO_ROOT / "scripts/team.py")]
# The claims here do not need the default five shot draws and 2000 bootstrap resamples of the
# evaluate stage; the gates still apply (every draw of the defaults clears them).
LEAN_PARAMS = {"evaluate": {"draws": 2, "bootstrap_resamples": 200}}


@dataclass(frozen=True)
class TeamStack:
    root: Path  # the stack's folder (TEAM_DIR)
    uri: str  # MLFLOW_TRACKING_URI
    env: dict  # a teammate's shell: the stack's URI and the secrets under test
    secrets: dict  # name -> value of the secrets in that environment

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="session")
def team_stack(pipeline_env: dict):
    """The team stack, started as `make team-up` does, with a database password and an S3
    secret set in the environment of the stack and of every command the tests run."""
    check = subprocess.run([*TEAM_SCRIPT, "check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        pytest.skip(f"no team stack on this machine: {check.stderr.strip()}")
    # A folder PostgreSQL's own user can enter (pytest's tmp folders are private to us).
    root = Path(tempfile.mkdtemp(prefix="team-stack-"))
    root.chmod(0o755)
    hidden = {
        "TEAM_DB_PASSWORD": f"db-{secrets.token_hex(16)}",
        "AWS_SECRET_ACCESS_KEY": f"s3-{secrets.token_hex(16)}",
    }
    env = pipeline_env | hidden | {"TEAM_DIR": str(root), "AWS_ACCESS_KEY_ID": "team-tests"}
    try:
        run_command([*TEAM_SCRIPT, "up"], REPO_ROOT, env, timeout=300)
        uri = team.read_env(team.stack_from_env(str(root)))["MLFLOW_TRACKING_URI"]
        yield TeamStack(root, uri, env | {"MLFLOW_TRACKING_URI": uri}, hidden)
        server = int((root / "mlflow.pid").read_text())
        run_command([*TEAM_SCRIPT, "down"], REPO_ROOT, env, timeout=120)
        # A clean down: no process of the server's group, PostgreSQL stopped.
        assert not team.group_alive(server)
        assert not (root / "pgdata/postmaster.pid").exists()
    finally:
        subprocess.run([*TEAM_SCRIPT, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def team_repo(tmp_path_factory, team_stack: TeamStack) -> Path:
    """A project repo after one cold `dvc repro` logged to the stack, outputs committed; the
    output of that run sits beside the repo in ``repro.log``."""
    repo = new_project_repo(tmp_path_factory.mktemp("team") / "repo", team_stack.env)
    set_params(repo, **LEAN_PARAMS)
    commit_all(repo, team_stack.env, "lean params")
    cold = run_command(["dvc", "repro"], repo, team_stack.env)
    assert ran_stages(cold.stdout) == PIPELINE_STAGES, cold.stdout
    (repo.parent / "repro.log").write_text(cold.stdout + cold.stderr)
    commit_all(repo, team_stack.env, "outputs")
    return repo


def head(repo: Path, rev: str = "HEAD") -> str:
    return run_command(["git", "rev-parse", rev], repo, os.environ).stdout.strip()


def experiment_id(client) -> str:
    return client.get_experiment_by_name(EXPERIMENT).experiment_id


def children(client, parent) -> dict:
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {run.data.tags["stage"]: run for run in runs}


def database_rows(stack: TeamStack, query: str, *args) -> list[tuple]:
    """Rows of ``query`` on the stack's PostgreSQL database, read directly."""
    import psycopg2

    port = int(team.read_env(team.stack_from_env(str(stack.root)))["TEAM_DB_PORT"])
    with psycopg2.connect(
        host=team.HOST,
        port=port,
        user=team.DEFAULTS["TEAM_DB_USER"],
        password=stack.secrets["TEAM_DB_PASSWORD"],
        dbname=team.DEFAULTS["TEAM_DB_NAME"],
    ) as connection, connection.cursor() as cursor:  # fmt: skip
        cursor.execute(query, args)
        return cursor.fetchall()


def test_up_again_keeps_the_running_stack(team_stack: TeamStack) -> None:
    """`make team-up` twice: the second finds both servers and changes nothing."""
    server = (team_stack.root / "mlflow.pid").read_text()
    again = run_command([*TEAM_SCRIPT, "up"], REPO_ROOT, team_stack.env, timeout=300)
    assert f"MLflow at {team_stack.uri} " in again.stdout
    assert (team_stack.root / "mlflow.pid").read_text() == server
    status = run_command([*TEAM_SCRIPT, "status"], REPO_ROOT, team_stack.env)
    assert f"MLflow server: running at {team_stack.uri}" in status.stdout


def test_the_pipeline_logs_to_the_shared_server(
    team_stack: TeamStack, team_repo: Path, monkeypatch, tmp_path: Path
) -> None:
    """One parent with six children, stored in PostgreSQL, artifacts on the server's side;
    the champion loads from the server's registry and predicts what evaluate measured, and
    `mlflow models serve` of it, in a teammate's shell, answers the same."""
    import mlflow.pyfunc
    from test_mlflow_e2e import as_labels, serve_and_ask

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    client = team_stack.client()
    project_commit = head(team_repo, "HEAD~1")
    (parent,) = client.search_runs(
        [experiment_id(client)],
        f"tags.`pipeline.role` = 'parent' and tags.`git.commit` = '{project_commit}'",
    )
    runs = children(client, parent)
    assert sorted(runs) == sorted(PIPELINE_STAGES)
    assert all(run.info.status == "FINISHED" for run in [parent, *runs.values()])
    assert parent.data.params["evaluate.draws"] == "2"

    ids = [parent.info.run_id] + [run.info.run_id for run in runs.values()]
    query = "SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)"
    stored = database_rows(team_stack, query, ids)
    assert sorted(stored) == sorted((run_id, "FINISHED") for run_id in ids)
    # Proxied artifacts: in the server's artifact folder, nothing in the repo.
    assert list(team_stack.root.glob(f"artifacts/**/{parent.info.run_id}/artifacts/params.yaml"))
    assert not [p for p in ("mlruns", "mlartifacts", "mlflow.db") if (team_repo / p).exists()]

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == runs["finetune"].info.run_id
    assert champion.tags["parent_run_id"] == parent.info.run_id
    aliases = database_rows(
        team_stack, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL
    )
    assert ("champion", int(champion.version)) in aliases

    mlflow.set_tracking_uri(team_stack.uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    target = pd.read_parquet(team_repo / "data/splits/target_test.parquet")
    predicted = model.predict(target.drop(columns=["label", "domain"]))
    accuracy = (predicted.to_numpy() == target["label"]).mean()
    metrics = json.loads((team_repo / "metrics/evaluate.json").read_text())
    assert round(accuracy, 6) == metrics["finetuned"]["accuracy"]

    rows = target.drop(columns=["label", "domain"]).head(7)
    (served,) = serve_and_ask(
        f"models:/{MODEL}@champion", rows, team_stack.env, tmp_path / "serve.log"
    )
    assert as_labels(served) == predicted.head(7).tolist()


def test_parallel_queued_experiments_lose_no_run(
    team_stack: TeamStack, team_repo: Path, tmp_path: Path
) -> None:
    """Two experiments through `dvc queue start -j 2`, both logging to the server at once:
    both succeed, each has its parent with its params and its evaluate child, each registered
    a model version, and no other run appeared or went missing."""
    repo = copy_project(team_repo, tmp_path / "repo")
    env = team_stack.env
    client = team_stack.client()
    before = client.search_runs([experiment_id(client)], max_results=1000)
    settings = [f"evaluate.bootstrap_seed={seed}" for seed in (1, 2)]
    status = run_queued_experiments(repo, env, settings, timeout=600)
    names = [line.split()[1] for line in status.splitlines() if "Success" in line]
    assert len(names) == 2, status
    logs = "".join(run_command(["dvc", "queue", "logs", n], repo, env).stdout for n in names)
    assert "Traceback" not in logs and "tracking:" not in logs

    after = client.search_runs([experiment_id(client)], max_results=1000)
    known = {run.info.run_id for run in before}
    new = [run for run in after if run.info.run_id not in known]
    assert len(new) == 4 and all(run.info.status == "FINISHED" for run in new)
    parents = {r.data.tags["dvc_exp_name"]: r for r in new if "pipeline.role" in r.data.tags}
    assert sorted(parents) == sorted(names)
    assert sorted(p.data.params["evaluate.bootstrap_seed"] for p in parents.values()) == ["1", "2"]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    for parent in parents.values():
        assert sorted(children(client, parent)) == ["evaluate"]
        assert parent.data.tags["git.commit"] == head(team_repo)
        registered = [v for v in versions if v.tags["parent_run_id"] == parent.info.run_id]
        assert len(registered) == 1


def test_a_fresh_experiment_created_by_many_at_once(team_stack: TeamStack, monkeypatch) -> None:
    """Stages of parallel executions on a new server all create the experiment at once: each
    gets the one experiment, none fails (on a server no file lock can order them)."""
    import threading

    from mlflow import MlflowClient

    from stages.core.tracking import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_stack.uri)
    name = f"created-at-once-{secrets.token_hex(4)}"
    start = threading.Barrier(8)
    results: list = []

    def create() -> None:
        start.wait()
        try:
            results.append(store.ensure_experiment(name))
        except Exception as exc:  # a failure is the result under test
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    experiment = MlflowClient(team_stack.uri).get_experiment_by_name(name)
    assert results == [experiment.experiment_id] * 8


def test_a_dvc_remote_round_trip(team_stack: TeamStack, team_repo: Path, tmp_path: Path) -> None:
    """`dvc push` to a local-path remote; a fresh `git clone` + `dvc pull` gets every output,
    byte for byte, and its `dvc repro` runs no stage (and logs nothing)."""
    repo = copy_project(team_repo, tmp_path / "repo")
    env = team_stack.env
    remote = tmp_path / "remote"
    run_command(["dvc", "remote", "add", "-d", "storage", str(remote)], repo, env)
    commit_all(repo, env, "remote")
    pushed = run_command(["dvc", "push"], repo, env)
    assert "pushed" in pushed.stdout, pushed.stdout

    clone = tmp_path / "clone"
    run_command(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "models/finetuned").exists()
    run_command(["dvc", "pull"], clone, env)
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for out in (o for stage in locked.values() for o in stage["outs"]):
        path = Path(out["path"])
        files = sorted(p.relative_to(repo) for p in (repo / path).rglob("*") if p.is_file())
        files = files or [path]
        for file in files:
            assert (clone / file).read_bytes() == (repo / file).read_bytes(), file

    client = team_stack.client()
    runs_before = len(client.search_runs([experiment_id(client)], max_results=1000))
    again = run_command(["dvc", "repro"], clone, env)
    assert ran_stages(again.stdout) == [] and "up to date" in again.stdout, again.stdout
    status = run_command(["dvc", "status"], clone, env)
    assert "Data and pipelines are up to date." in status.stdout
    assert len(client.search_runs([experiment_id(client)], max_results=1000)) == runs_before


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def holding(paths: list[Path], needles: list[str]) -> list[str]:
    """``path: needle`` for every file that contains a needle (as bytes)."""
    found = []
    for path in paths:
        data = path.read_bytes()
        found += [f"{path}: {needle}" for needle in needles if needle.encode() in data]
    return found


def test_no_secret_leaks(team_stack: TeamStack, team_repo: Path, tmp_path: Path) -> None:
    """The database password and the S3 secret were in the environment of the stack and of
    the whole pipeline run. They appear in no output, log, dvc.lock, MLflow param, tag, metric
    key or artifact, in no row of the database, and on no process's command line."""
    needles = list(team_stack.secrets.values())
    # The search finds what is there.
    canary = tmp_path / "canary.txt"
    canary.write_text(f"x{needles[0]}x")
    assert holding([canary], needles) == [f"{canary}: {needles[0]}"]

    # Every file of the repo (outputs, dvc.lock, DVC's cache and tmp, git's files), the run's
    # log, the stack's folder: its logs, its env file, every artifact it stores.
    searched = files_under(team_repo, team_stack.root / "logs", team_stack.root / "artifacts")
    searched += [team_repo.parent / "repro.log", team_stack.root / "env"]
    assert not (team_stack.root / "secrets").exists()  # the password came from the environment
    assert team_repo / "dvc.lock" in searched and len(searched) > 100
    assert any("model.safetensors" in p.name for p in searched if "artifacts" in p.parts)
    assert holding(searched, needles) == []

    client = team_stack.client()
    texts = []
    for experiment in client.search_experiments():
        texts += [experiment.name, *experiment.tags.values(), experiment.artifact_location]
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            data = run.data
            texts += [*data.params, *data.params.values(), *data.tags, *data.tags.values()]
            texts += list(data.metrics)
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        texts += [version.source, *version.tags, *version.tags.values()]
    assert len(texts) > 500
    assert [t for t in texts if any(n in str(t) for n in needles)] == []

    # Everything MLflow stored, from the database itself.
    port = team.read_env(team.stack_from_env(str(team_stack.root)))["TEAM_DB_PORT"]
    pg_dump = [str(team.postgres_bin() / "pg_dump"), "-h", team.HOST, "-p", port]
    dump = subprocess.run(
        [*pg_dump, "-U", team.DEFAULTS["TEAM_DB_USER"], team.DEFAULTS["TEAM_DB_NAME"]],
        env={"PGPASSWORD": team_stack.secrets["TEAM_DB_PASSWORD"], "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert client.get_model_version_by_alias(MODEL, "champion").run_id in dump.stdout
    assert [n for n in needles if n in dump.stdout] == []

    command_lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command_lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended
            continue
    assert any("mlflow" in line and "server" in line for line in command_lines)
    assert [line for line in command_lines if any(n in line for n in needles)] == []


def test_the_server_dies_while_a_stage_logs(
    team_stack: TeamStack, team_repo: Path, tmp_path: Path
) -> None:
    """The MLflow server is killed while train logs its epochs: the stage fails with one line
    naming the URI, DVC records nothing for it, and once `team.py up` has brought the server
    back (on the same URI) the same command completes."""
    repo = copy_project(team_repo, tmp_path / "repo")
    env = team_stack.env
    set_params(repo, train={"epochs": 400, "patience": None})
    commit_all(repo, env, "long training")
    lock_before = (repo / "dvc.lock").read_text()
    cache_before = {p.relative_to(repo) for p in files_under(repo / ".dvc/cache")}
    client = team_stack.client()
    started = int(time.time() * 1000)
    with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
        command = ["dvc", "repro", "-s", "train"]
        stage = subprocess.Popen(command, cwd=repo, env=env, stdout=out, stderr=err)
        try:
            logging_run = None
            deadline = time.monotonic() + 300
            while logging_run is None and time.monotonic() < deadline:
                assert stage.poll() is None, "train ended before the server could be stopped"
                logging_run = next(
                    (
                        run
                        for run in client.search_runs(
                            [experiment_id(client)],
                            f"tags.stage = 'train' and attributes.start_time >= {started}",
                        )
                        if "val_loss" in run.data.metrics
                    ),
                    None,
                )
                time.sleep(0.3)
            assert logging_run is not None and logging_run.info.status == "RUNNING"
            server = int((team_stack.root / "mlflow.pid").read_text())
            os.killpg(server, signal.SIGKILL)
            killed = time.monotonic()
            returncode = stage.wait(timeout=300)
            failed_after = time.monotonic() - killed
        finally:
            if stage.poll() is None:
                stage.kill()
        err.seek(0)
        stderr = err.read()
    print(f"train failed {failed_after:.1f} s after the server was killed: {stderr.strip()}")
    assert returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"train: error: tracking: {team_stack.uri}: "), errors
    assert (repo / "dvc.lock").read_text() == lock_before
    assert {p.relative_to(repo) for p in files_under(repo / ".dvc/cache")} == cache_before

    run_command([*TEAM_SCRIPT, "up"], REPO_ROOT, env, timeout=300)
    stack_env = team.read_env(team.stack_from_env(str(team_stack.root)))
    assert stack_env["MLFLOW_TRACKING_URI"] == team_stack.uri
    again = run_command(["dvc", "repro", "-s", "train"], repo, env)
    assert ran_stages(again.stdout) == ["train"]
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    assert locked["params"]["params.yaml"]["train"]["epochs"] == 400
    (finished,) = client.search_runs(
        [experiment_id(client)],
        f"tags.stage = 'train' and attributes.start_time >= {started} "
        "and attributes.status = 'FINISHED'",
    )
    if "train: resuming from epoch" in again.stdout:
        # The stage had checkpointed before it failed: it resumes, in the run it was logging to.
        assert finished.info.run_id == logging_run.info.run_id
    else:
        assert finished.info.run_id != logging_run.info.run_id
    assert finished.data.params["train.epochs"] == "400"
