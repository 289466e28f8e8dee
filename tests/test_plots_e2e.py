"""DVC plots end to end: `dvc plots show` and `dvc plots diff` on a temporary git repo holding the
project's plot definitions, its offline HTML template and real plot files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvc/plots/index.html",
    "plots/train.csv",
    "plots/finetune.csv",
    "plots/confusion.csv",
    "plots/roc.csv",
    "plots/precision_recall.csv",
    "plots/per_class",
]
TOP_LEVEL_PLOTS = [
    "loss",
    "val_accuracy",
    "confusion",
    "confusion_normalized",
    "roc",
    "precision_recall",
    "per_class_f1",
]
VENDORED = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}

pytestmark = pytest.mark.e2e


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("plots")
    for name in FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    git_id = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", *git_id, "commit", "-qm", "plots"], repo)
    return repo


def test_plots_show_renders_from_the_inlined_vega(repo: Path) -> None:
    run(["dvc", "plots", "show", "-o", "page"], repo)
    html = (repo / "page" / "index.html").read_text()
    # Nothing to fetch: no script loaded from anywhere, the three libraries inlined
    assert not re.search(r"<script[^>]*\ssrc\s*=", html)
    assert "cdn.jsdelivr" not in html
    assert f'.version="{VENDORED["vega"]}"' in html
    assert f'var n="{VENDORED["vega-lite"]}"' in html
    assert "vegaEmbed" in html and "{plot_divs}" not in html
    # One embedded chart per top-level definition, plus the train/finetune stage plots
    assert html.count("vegaEmbed('#") == len(TOP_LEVEL_PLOTS) + 2
    data = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    assert set(TOP_LEVEL_PLOTS) <= set(data)
    roc = data["roc"][0]["content"]["data"]["values"]
    assert {"fpr", "tpr"} <= set(roc[0]) and len(roc) > 10
    per_class = data["per_class_f1"][0]["content"]["data"]["values"]
    assert {row["filename"] for row in per_class} == {"base.csv", "finetuned.csv", "scratch.csv"}


def test_plots_diff_compares_two_revisions(repo: Path) -> None:
    roc = repo / "plots" / "roc.csv"
    lines = roc.read_text().splitlines()
    roc.write_text("\n".join([lines[0], "0,0", "0.5,0.9", "1,1"]) + "\n")  # a worse model
    data = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], repo).stdout)["data"]
    assert sorted(data["roc"][0]["revisions"]) == ["HEAD", "workspace"]
    values = data["roc"][0]["content"]["data"]["values"]
    by_rev = {rev: [v for v in values if v["rev"] == rev] for rev in ("HEAD", "workspace")}
    assert len(by_rev["workspace"]) == 3 and len(by_rev["HEAD"]) == len(lines) - 1
    run(["dvc", "plots", "diff", "HEAD", "-o", "diff"], repo)
    assert (repo / "diff" / "index.html").is_file()
    run(["git", "checkout", "--", "plots/roc.csv"], repo)
