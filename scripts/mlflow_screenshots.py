"""Screenshots of the project's MLflow UI in headless Chromium: the runs table (parents with
their stage runs) and the chart view comparing the pipeline executions (parent runs only).

    .venv/bin/python -m scripts.mlflow_screenshots [--out docs/images]

Needs Debian's chromium (`apt-get install chromium`) and a local store with a few executions
(`dvc repro`, then e.g. `dvc exp run -S train.epochs=5` and `-S train.epochs=10`). Not run in CI.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from scripts.mlflow_ui import runs_table_url
from scripts.team import free_port, health
from stages.core.common.params import load_params
from stages.core.tracking.store import ensure_experiment, local_store_uri, repo_root

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Virtual time the page gets to load before the shot: the chart view draws its charts lazily.
TIME_BUDGET_MS = {"table": 25_000, "charts": 90_000}


PARENTS_FILTER = "tags.`pipeline.role` = 'parent'"


def screenshot(url: str, path: Path, size: str, budget_ms: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             f"--virtual-time-budget={budget_ms}",
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
        deadline = time.monotonic() + 60
        while not health(port):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"mlflow ui on port {port} did not start")
            time.sleep(0.5)
        table = runs_table_url(base, experiment_id)
        screenshot(table, args.out / "mlflow-runs.png", "1600,900", TIME_BUDGET_MS["table"])
        # The experiment's own tab route: the bare experiment route redirects there and drops
        # every query parameter but workflowType.
        charts = f"{base}/#/experiments/{experiment_id}/runs?" + urllib.parse.urlencode(
            {"workflowType": "machine_learning", "compareRunsMode": "CHART",
             "searchFilter": PARENTS_FILTER},
            quote_via=urllib.parse.quote,
        )  # fmt: skip
        screenshot(charts, args.out / "mlflow-compare.png", "1600,1100", TIME_BUDGET_MS["charts"])
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
