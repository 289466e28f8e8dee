"""`make ui` (scripts/mlflow_ui.py) serves the store it reports: the stages' store, the one
MLFLOW_TRACKING_URI names when set (a real `mlflow ui` on a free port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT, new_store

from scripts.mlflow_ui import ui_command


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_the_ui_serves_the_store_mlflow_tracking_uri_names(monkeypatch, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'other.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    command = ui_command("127.0.0.1", 5123)
    assert command[1:2] == ["ui"]
    assert option(command, "--backend-store-uri") == other
    assert option(command, "--port") == "5123" and option(command, "--host") == "127.0.0.1"
    assert option(command, "--workers") == "1"
    assert not any("mlflow.db" in part for part in command)


def test_without_mlflow_tracking_uri_the_ui_serves_the_repo_store(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    command = ui_command("127.0.0.1", 5000)
    assert option(command, "--backend-store-uri") == f"sqlite:///{tmp_path}/mlflow.db"
    assert option(command, "--default-artifact-root") == (tmp_path / "mlartifacts").as_uri()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_make_ui_serves_the_experiment_it_prints(tmp_path: Path, empty_store: Path) -> None:
    """A repo with its own mlflow.db and MLFLOW_TRACKING_URI on another SQLite file: the id the
    script prints is the pipeline experiment's in the served store, which holds it."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "params.yaml").write_text("tracking:\n  experiment: shown-here\n")
    other = tmp_path / "other"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": new_store(empty_store, other, "other.db"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # the script's default is under test
    port = _free_port()
    log = (tmp_path / "ui.log").open("w+")
    ui = subprocess.Popen(
        [sys.executable, "-m", "scripts.mlflow_ui", "--port", str(port)],
        cwd=repo,
        env=env | {"DVC_ROOT": str(repo)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, Path(log.name).read_text()
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, Path(log.name).read_text()
                time.sleep(0.5)
        lines = Path(log.name).read_text().splitlines()
        [printed] = [line for line in lines if line.startswith("MLflow UI: ")]
        assert printed.startswith(f"MLflow UI: {base}/#/experiments/")
        experiment_id = printed.split("/#/experiments/")[1].split("?")[0]
        name = urllib.parse.quote("shown-here")
        served = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
        assert served["experiment"]["experiment_id"] == experiment_id
        # Served without MLflow's GenAI job runner (no `mlflow.server.jobs` process).
        import psutil

        commands = [" ".join(p.cmdline()) for p in psutil.Process(ui.pid).children(recursive=True)]
        # One uvicorn process serves it (MLflow's default of 4 would add 4 spawned workers).
        assert len(commands) == 1 and "uvicorn" in commands[0], commands
        assert not any("mlflow.server.jobs" in c or "huey" in c for c in commands), commands
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
