"""Screenshots of the project's MLflow UI in headless Chromium: the runs table (parents with
their stage runs) and a comparison chart of the three newest pipeline executions.

    .venv/bin/python -m scripts.mlflow_screenshots [--out docs/images]

Needs Debian's chromium (`apt-get install chromium`) and a local store with a few executions
(`dvc repro`, then e.g. `dvc exp run -S finetune.lr=0.005` twice). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from scripts.mlflow_ui import runs_table_url
from stages.core.params import load_params
from stages.core.tracking import ensure_experiment, local_store_uri, repo_root

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=25000",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(url: str, path: Path, size: str) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    print(f"{path}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    experiment_id = ensure_experiment(load_params().tracking.experiment)
    from mlflow import MlflowClient

    newest = MlflowClient(local_store_uri()).search_runs(
        [experiment_id],
        "tags.`pipeline.role` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=3,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", local_store_uri(),
         "--default-artifact-root", (repo_root() / "mlartifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        screenshot(runs_table_url(base, experiment_id), args.out / "mlflow-runs.png", "1600,900")
        if len(newest) >= 2:
            runs = urllib.parse.quote(json.dumps([run.info.run_id for run in newest]))
            experiments = urllib.parse.quote(json.dumps([experiment_id]))
            compare = f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"
            screenshot(compare, args.out / "mlflow-compare.png", "1600,1100")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
