"""Open the project's MLflow UI on its runs table: prints the address, then serves the local store.

    .venv/bin/python -m scripts.mlflow_ui [--port 5000]      (or: make ui)

MLflow 3's UI opens an experiment on its GenAI overview by default; the address printed here
carries `?workflowType=machine_learning`, which opens the "Model training" view and its runs
table: one parent row per pipeline execution, its stage runs nested under it. With
MLFLOW_TRACKING_URI set to a server, it prints that server's address and serves nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stages.core.common.params import load_params
from stages.core.tracking.store import ensure_experiment, local_store_uri, repo_root, tracking_uri


def runs_table_url(base: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in the Model training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    experiment_id = ensure_experiment(load_params().tracking.experiment)
    uri = tracking_uri()
    if uri.startswith("http"):
        print(runs_table_url(uri, experiment_id))
        return
    print(f"MLflow UI: {runs_table_url(f'http://{args.host}:{args.port}', experiment_id)}")
    print("(Ctrl-C stops it)", flush=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    os.execv(
        mlflow,
        [
            str(mlflow), "ui", "--backend-store-uri", local_store_uri(),
            "--default-artifact-root", (repo_root() / "mlartifacts").as_uri(),
            "--host", args.host, "--port", str(args.port),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
