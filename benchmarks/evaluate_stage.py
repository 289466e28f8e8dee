"""The evaluate stage of the working tree vs the same stage at a git revision, on the same inputs.

Copies the inputs of the evaluate stage (data/splits, models, plots/train.csv, plots/finetune.csv)
into two scratch directories, one with the revision's stages/ and params.yaml, one with the working
tree's, then runs `python -m stages.evaluate` in each, alternating, and prints the best time of
each and their ratio (target <= 1.5), in wall time and in CPU time (user + system, steadier on a
busy machine). Each side logs to its own warm MLflow store. Run from the repo root after
`dvc repro` (the inputs must exist):

    .venv/bin/python -m benchmarks.evaluate_stage [--rev main] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

INPUTS = ["data/splits", "models/base", "models/finetuned", "plots/train.csv", "plots/finetune.csv"]


def prepare(directory: Path, rev: str | None) -> None:
    """Inputs from the working tree; code and params from ``rev`` (None: the working tree)."""
    for name in INPUTS:
        source, target = Path(name), directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    if rev is None:
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree("stages", directory / "stages", ignore=skip)
        shutil.copy2("params.yaml", directory / "params.yaml")
        return
    archive = subprocess.run(
        ["git", "archive", rev, "stages", "params.yaml"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(directory: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `python -m stages.evaluate` in ``directory``."""
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}",
        "PYTHONPATH": str(directory),
        # A plain process, whose CPU its parent's counters see (a stage forked by the warm
        # server is not this process's child).
        "PIPELINE_WARM_SERVER": "off",
    }
    start, cpu = time.perf_counter(), cpu_of_children()
    subprocess.run(
        [sys.executable, "-m", "stages.evaluate"],
        cwd=directory,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, cpu_of_children() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="the baseline revision (default: main)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sides = {args.rev: Path(scratch) / "baseline", "working tree": Path(scratch) / "current"}
        prepare(sides[args.rev], args.rev)
        prepare(sides["working tree"], None)
        for directory in sides.values():
            run_stage(directory)  # warm-up: creates the MLflow store, fills the OS file cache
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, directory in sides.items():
                times[name].append(run_stage(directory))
    for kind, index in (("wall", 0), ("cpu", 1)):
        best = {name: min(t[index] for t in values) for name, values in times.items()}
        for name, values in times.items():
            runs = ", ".join(f"{t[index]:.2f}" for t in values)
            print(f"{kind:4} {name}: best {best[name]:.2f} s of {args.rounds} ({runs})")
        ratio = best["working tree"] / best[args.rev]
        print(f"{kind:4} ratio working tree / {args.rev}: {ratio:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
