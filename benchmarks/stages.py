"""Each stage's fixed cost (interpreter start, imports, tracking set-up) and its work.

In a scratch copy of the project (default params, after one `dvc repro`), every stage runs:
- cold: `python -m stages.<name>` as DVC runs it, a fresh process with tracking on, N times;
- warm: `main()` again in one process that has already run it once (imports done, torch's
  lazy modules loaded), tracking off, N times: the stage's own work.
fixed = cold - warm (medians). Also the wall time of a cold `dvc repro -f` (--repro).

    .venv/bin/python -m benchmarks.stages [--repeat 3] [--repro]

Prints a table, then one JSON line. Target: fixed <= 2.5 s for every stage but validate
(Great Expectations' import); cold `dvc repro -f` <= 25 s on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "validate", "split", "tokenize", "train", "finetune", "evaluate"]
PROJECT = ["dvc.yaml", "params.yaml", "stages", "data/source", "data/suites", ".dvcignore"]
PROJECT += [".gitignore"]
PROJECT += [".dvc/config", ".dvc/plots"]
WARM = """
import json, os, sys, time
from stages.core.common.cli import run_stage
module = __import__(f"stages.{sys.argv[1]}", fromlist=["main"])
os.environ["PIPELINE_TRACKING"] = "off"
run_stage(sys.argv[1], module.main)  # warm-up: lazy imports, caches
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    run_stage(sys.argv[1], module.main)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def environment(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env | {"DVC_ROOT": str(repo), "PYTHONPATH": str(repo)}


def prepare(directory: Path) -> Path:
    """A git repo with the project and the outputs of one `dvc repro`."""
    repo = directory / "repo"
    for name in PROJECT:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, target)
    env = environment(repo)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True, capture_output=True)
    return repo


def timed(cmd: list[str], repo: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--repro", action="store_true", help="also time `dvc repro -f`")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        repo = prepare(Path(scratch))
        env = environment(repo)
        for stage in STAGES:
            cold = [
                timed([sys.executable, "-m", f"stages.{stage}"], repo, env)
                for _ in range(args.repeat)
            ]
            warm_run = subprocess.run(
                [sys.executable, "-c", WARM, stage, str(args.repeat)],
                cwd=repo,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            warm = json.loads(warm_run.stdout.strip().splitlines()[-1])
            cold_s, warm_s = statistics.median(cold), statistics.median(warm)
            results[stage] = {
                "cold_s": round(cold_s, 2),
                "work_s": round(warm_s, 2),
                "fixed_s": round(cold_s - warm_s, 2),
            }
        if args.repro:
            repro = [timed(["dvc", "repro", "-f", "-q"], repo, env) for _ in range(args.repeat)]
            results["dvc repro -f"] = {"cold_s": round(statistics.median(repro), 2)}
    print(f"{'stage':<14}{'cold s':>8}{'work s':>8}{'fixed s':>9}{'cold/work':>11}")
    for stage, row in results.items():
        if "work_s" in row:
            ratio = row["cold_s"] / row["work_s"] if row["work_s"] else float("inf")
            print(
                f"{stage:<14}{row['cold_s']:>8.2f}{row['work_s']:>8.2f}"
                f"{row['fixed_s']:>9.2f}{ratio:>11.2f}"
            )
        else:
            print(f"{stage:<14}{row['cold_s']:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
