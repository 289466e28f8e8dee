"""What tracking costs a stage, and how fast a stage gives up on a dead tracking server.

In a scratch copy of the project (default params, after one `dvc repro`):
- the train stage (`python -m stages.train`) with tracking off and on, each as a plain process
  with a plain worker (`PIPELINE_WARM_SERVER=off`) and forked with its worker by the warm
  server, alternating, N rounds; prints the medians of wall time and of the whole machine's
  CPU time (a forked stage or worker is not the caller's child: only the machine's counters
  see its CPU), the ratios against the plain stage with tracking off, and what tracking costs
  each way (target <= 1.1);
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

# The tracking settings compared, each against the stage with tracking off.
MODES = {
    "plain, tracking off": {"PIPELINE_TRACKING": "off", "PIPELINE_WARM_SERVER": "off"},
    "plain, tracking on": {"PIPELINE_TRACKING": "on", "PIPELINE_WARM_SERVER": "off"},
    "warm, tracking off": {"PIPELINE_TRACKING": "off", "PIPELINE_WARM_SERVER": "on"},
    "warm, tracking on": {"PIPELINE_TRACKING": "on", "PIPELINE_WARM_SERVER": "on"},
}
BASELINE = "plain, tracking off"


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy so far."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def run(
    cmd: list[str], repo: Path, env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - start, done


def run_with_cpu(
    cmd: list[str], repo: Path, env: dict[str, str]
) -> tuple[float, float, subprocess.CompletedProcess]:
    """``run``, and the machine's CPU seconds meanwhile (a forked worker ends with its stage)."""
    before = machine_cpu_s()
    seconds, done = run(cmd, repo, env)
    return seconds, machine_cpu_s() - before, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    train = [sys.executable, "-m", "stages.train"]
    with tempfile.TemporaryDirectory() as scratch:
        repo = prepare(Path(scratch))
        env = environment(repo)
        run(train, repo, env | MODES["warm, tracking on"])  # starts the server (runs plain)
        time.sleep(15)  # until the server has imported its libraries
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode, setting in MODES.items():
                seconds, cpu_s, done = run_with_cpu(train, repo, env | setting)
                assert done.returncode == 0, done.stderr
                times[mode].append(seconds)
                cpu[mode].append(cpu_s)
        wall = {mode: statistics.median(values) for mode, values in times.items()}
        busy = {mode: statistics.median(values) for mode, values in cpu.items()}
        for mode in MODES:
            ratio_wall, ratio_cpu = wall[mode] / wall[BASELINE], busy[mode] / busy[BASELINE]
            print(
                f"train, {mode}: {wall[mode]:.2f} s wall (x{ratio_wall:.2f}),"
                f" {busy[mode]:.2f} s CPU (x{ratio_cpu:.2f})"
            )
        tracking = {
            way: wall[f"{way}, tracking on"] / wall[f"{way}, tracking off"]
            for way in ("plain", "warm")
        }
        print(f"tracking on / off: plain x{tracking['plain']:.2f}, warm x{tracking['warm']:.2f}")

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
        "wall_s": {mode: round(value, 2) for mode, value in wall.items()},
        "tracking_ratio": {way: round(value, 3) for way, value in tracking.items()},
        "cpu_s": {mode: round(value, 2) for mode, value in busy.items()},
        "fail_refused_s": fail["refused"][0],
        "fail_silent_s": fail["silent"][0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
