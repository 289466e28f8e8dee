"""Open the project's MLflow UI on its runs table: prints the address, then serves the store.

    .venv/bin/python -m scripts.mlflow_ui [--port 5000] [--workers 1]      (or: make ui)

MLflow 3's UI opens an experiment on its GenAI overview by default; the address printed here
carries `?workflowType=machine_learning`, which opens the "Model training" view and its runs
table: one parent row per pipeline execution, its stage runs nested under it. The store is the
stages' own: MLFLOW_TRACKING_URI (another SQLite file, a folder), else the repo's mlflow.db. With
MLFLOW_TRACKING_URI set to a server, it prints that server's address and serves nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stages.core.common.params import load_params
from stages.core.tracking.store import (
    ensure_experiment,
    local_store_uri,
    redact,
    repo_root,
    tracking_uri,
)


def runs_table_url(base: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in the Model training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_command(host: str, port: int, workers: int = 1) -> list[str]:
    """The `mlflow ui` command line that serves the store the stages log to (tracking_uri()):
    the repo's mlflow.db with its artifacts beside it, or the store MLFLOW_TRACKING_URI names;
    on ``workers`` uvicorn processes."""
    uri = tracking_uri()
    command = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", uri]
    if uri == local_store_uri():
        command += ["--default-artifact-root", (repo_root() / "mlartifacts").as_uri()]
    return command + ["--host", host, "--port", str(port), "--workers", str(workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    # One process, not MLflow's default of 4: a local UI serves one person, and each worker
    # imports the whole server (with 4: up in 13-14 s and 25 CPU-s here; with 1: 8 s, 11 CPU-s).
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    experiment_id = ensure_experiment(load_params().tracking.experiment)
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # A server's address, less any credentials in it (the browser asks for its own).
        print(runs_table_url(redact(uri), experiment_id))
        return
    print(f"MLflow UI: {runs_table_url(f'http://{args.host}:{args.port}', experiment_id)}")
    print(f"(serving {redact(uri)}; Ctrl-C stops it)", flush=True)
    command = ui_command(args.host, args.port, args.workers)
    # No job runner: it serves MLflow's GenAI jobs (scorers, trace roll-ups), which this
    # pipeline never queues, and costs about 8 more processes and 5 s of start-up here. The
    # team stack's server runs without it too (scripts/team.py); set it to true to have it.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
