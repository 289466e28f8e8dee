"""What tracking costs a stage, and how fast a stage gives up on a dead tracking server.

In a scratch copy of the project (default params, after one `dvc repro`):
- the train stage (`python -m stages.train`) with tracking on (local SQLite store: parent-less
  run, params, per-epoch metrics, datasets, the pyfunc model) and with `PIPELINE_TRACKING=off`,
  alternating, N rounds; prints the medians and their ratio (target <= 1.1);
- the split stage against a server that refuses connections and one that accepts them and never
  answers: seconds until the stage exits with its one-line error (target < 15 s).

    .venv/bin/python -m benchmarks.tracking [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.stages import environment, prepare


def run(
    cmd: list[str], repo: Path, env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    train = [sys.executable, "-m", "stages.train"]
    with tempfile.TemporaryDirectory() as scratch:
        repo = prepare(Path(scratch))
        env = environment(repo)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                seconds, done = run(train, repo, env | {"PIPELINE_TRACKING": mode})
                assert done.returncode == 0, done.stderr
                times[mode].append(seconds)
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"train, tracking off: {off:.2f} s; on: {on:.2f} s; ratio {on / off:.2f}")

        fail = {}
        split = [sys.executable, "-m", "stages.split"]
        with socket.socket() as refused:
            refused.bind(("127.0.0.1", 0))
            port = refused.getsockname()[1]
        seconds, done = run(split, repo, env | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        fail["refused"] = (round(seconds, 2), done.returncode, done.stderr.strip())
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
            seconds, done = run(split, repo, env | {"MLFLOW_TRACKING_URI": uri})
        fail["silent"] = (round(seconds, 2), done.returncode, done.stderr.strip())
        for kind, (seconds, code, line) in fail.items():
            print(f"split against a {kind} server: exit {code} after {seconds:.2f} s: {line}")
    summary = {
        "train_tracking_on_s": round(on, 2),
        "train_tracking_off_s": round(off, 2),
        "ratio": round(on / off, 3),
        "fail_refused_s": fail["refused"][0],
        "fail_silent_s": fail["silent"][0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
