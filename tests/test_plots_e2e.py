"""DVC plots end to end: `dvc plots show` and `dvc plots diff` on a temporary git repo holding the
project's plot definitions, its offline HTML template and real plot files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import run_command

VENDORED = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}

pytestmark = pytest.mark.e2e


def plot_definitions(repo: Path) -> tuple[list[str], list[str]]:
    """The top-level plot names of dvc.yaml, and the files stages declare as plots."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    top = [next(iter(entry)) for entry in pipeline.get("plots", [])]
    staged = [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for stage in pipeline["stages"].values()
        for entry in stage.get("plots", [])
    ]
    return top, staged


def run(cmd: list[str], repo: Path, env: dict) -> subprocess.CompletedProcess:
    return run_command(cmd, repo, env)


def embedded_specs(html: str) -> dict[str, dict]:
    """The Vega-Lite spec of each chart of a DVC plots page, by its div id."""
    decoder = json.JSONDecoder()
    opening = r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = '
    return {m[1]: decoder.raw_decode(html, m.end())[0] for m in re.finditer(opening, html)}


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A plot file's rows as DVC embeds them: every value as the text of the file."""
    header, *lines = path.read_text().splitlines()
    return [dict(zip(header.split(","), line.split(","), strict=True)) for line in lines]


def test_plots_show_renders_from_the_inlined_vega(pipeline_repo: Path, pipeline_env) -> None:
    repo = pipeline_repo
    top_level, stage_plots = plot_definitions(repo)
    run(["dvc", "plots", "show", "-o", "page"], repo, pipeline_env)
    html = (repo / "page" / "index.html").read_text()
    # Nothing to fetch: no script loaded from anywhere, the three libraries inlined
    assert not re.search(r"<script[^>]*\ssrc\s*=", html)
    assert "cdn.jsdelivr" not in html
    assert f'.version="{VENDORED["vega"]}"' in html
    assert f'var n="{VENDORED["vega-lite"]}"' in html
    assert "vegaEmbed" in html and "{plot_divs}" not in html
    # One embedded chart per top-level definition, plus one per file a stage declares as plots
    assert html.count("vegaEmbed('#") == len(top_level) + len(stage_plots)
    # ... each holding our data: the ROC chart has our title and exactly plots/roc.csv's rows
    specs = embedded_specs(html)
    assert set(top_level) <= set(specs) and len(specs) == len(top_level) + len(stage_plots)
    roc_spec = specs["roc"]
    assert roc_spec["title"]["text"] == "ROC, micro-averaged over classes (fine-tuned model)"
    embedded = [{k: v[k] for k in ("fpr", "tpr")} for v in roc_spec["data"]["values"]]
    assert embedded == csv_rows(repo / "plots" / "roc.csv")
    data = json.loads(run(["dvc", "plots", "show", "--json"], repo, pipeline_env).stdout)["data"]
    assert set(top_level) <= set(data)
    roc = data["roc"][0]["content"]["data"]["values"]
    assert {"fpr", "tpr"} <= set(roc[0]) and len(roc) > 10
    per_class = data["per_class_f1"][0]["content"]["data"]["values"]
    assert {row["filename"] for row in per_class} == {"base.csv", "finetuned.csv", "scratch.csv"}


def test_plots_diff_compares_two_revisions(pipeline_repo: Path, pipeline_env) -> None:
    repo = pipeline_repo
    roc = repo / "plots" / "roc.csv"
    lines = roc.read_text().splitlines()
    committed = csv_rows(roc)
    roc.write_text("\n".join([lines[0], "0,0", "0.5,0.9", "1,1"]) + "\n")  # a worse model
    diff = run(["dvc", "plots", "diff", "HEAD", "--json"], repo, pipeline_env)
    data = json.loads(diff.stdout)["data"]
    assert sorted(data["roc"][0]["revisions"]) == ["HEAD", "workspace"]
    values = data["roc"][0]["content"]["data"]["values"]
    by_rev = {rev: [v for v in values if v["rev"] == rev] for rev in ("HEAD", "workspace")}
    assert len(by_rev["workspace"]) == 3 and len(by_rev["HEAD"]) == len(lines) - 1
    run(["dvc", "plots", "diff", "HEAD", "-o", "diff"], repo, pipeline_env)
    page = (repo / "diff" / "index.html").read_text()
    # The page's ROC chart holds both revisions' rows, exactly (not just text the inlined
    # libraries could contain): the edited file's in the workspace, the committed one's at HEAD
    values = embedded_specs(page)["roc"]["data"]["values"]
    rows = {
        rev: [{k: v[k] for k in ("fpr", "tpr")} for v in values if v["rev"] == rev]
        for rev in ("HEAD", "workspace")
    }
    assert {v["rev"] for v in values} == {"HEAD", "workspace"}
    assert rows["workspace"] == [
        {"fpr": "0", "tpr": "0"},
        {"fpr": "0.5", "tpr": "0.9"},
        {"fpr": "1", "tpr": "1"},
    ]
    assert rows["HEAD"] == committed and len(committed) > 10
