"""What ties an MLflow run to DVC: which pipeline execution a stage belongs to, the DVC md5 of
files and folders, what dvc.yaml and dvc.lock record, and the git state.

Plain functions over files and processes: no mlflow or torch here."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from stages.core.common.warm_start import STAGE_PID
from stages.core.common.yaml_files import read_yaml


def execution_key() -> str | None:
    """An id shared by the stages of one pipeline execution, None outside DVC.

    DVC exports no per-execution id, but each execution has its own `dvc` process that is an
    ancestor of every stage it runs: `dvc repro`, `dvc exp run`, or, for queued experiments,
    the `dvc exp exec-run` process of that experiment (each queued experiment has its own, also
    with `dvc queue start -j 2`). Its pid and start time identify it on this host. The search
    starts at the stage: this process's parent, or in a tracking worker the ``STAGE_PID``.
    """
    import psutil

    try:
        stage = os.environ.get(STAGE_PID)
        process = psutil.Process(int(stage)) if stage else psutil.Process().parent()
        while process is not None:
            if _is_dvc(process.cmdline()):
                return f"{socket.gethostname()}:{process.pid}:{_started(process)}"
            process = process.parent()
    except psutil.Error:  # an ancestor exited or is not ours to inspect
        return None
    return None


def execution_alive(key: str | None) -> bool:
    """Whether the DVC process that ``key`` (an execution_key) names still runs: False when it
    exited or its pid now belongs to another process; True for another host's execution,
    which this host cannot see."""
    import psutil

    if not key or key.count(":") < 2:
        return False
    host, pid, created = key.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        return _started(psutil.Process(int(pid))) == created
    except (psutil.Error, ValueError):  # gone, or not a pid
        return False


def _started(process) -> str:
    """When ``process`` (a psutil.Process) started, as the same text in every process that
    asks: on Linux its start in clock ticks after boot (/proc/<pid>/stat), which no change of
    the system clock moves; elsewhere psutil's create_time, seconds since the epoch. (That is
    the boot time plus the ticks, and the boot time the kernel reports moves with the clock:
    two stages of one execution, or a stage and a worker started earlier, could disagree.)"""
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:
        return f"{process.create_time():.3f}"
    return "t" + stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime; comm may hold ")"


def _is_dvc(cmdline: list[str]) -> bool:
    """`dvc ...`, `python .../bin/dvc ...` or `python -m dvc ...`."""
    names = [Path(part).name for part in cmdline[:3]]
    if names and names[0] == "dvc":
        return True
    if len(names) > 1 and names[0].startswith("python"):
        return names[1] == "dvc" or (names[1] == "-m" and len(names) > 2 and names[2] == "dvc")
    return False


# The last parse of each dvc.yaml and dvc.lock, with the version it read (size, mtime, inode): a
# run reads dvc.yaml once per pipeline stage to list their outputs. Callers only read it.
_parsed: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def _read_yaml(path: Path | str) -> dict[str, Any]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return {}
    where, version = os.path.abspath(path), (info.st_size, info.st_mtime_ns, info.st_ino)
    cached = _parsed.get(where)
    if cached is None or cached[0] != version:
        try:
            cached = _parsed[where] = (version, read_yaml(path) or {})
        except FileNotFoundError:
            return {}
    return cached[1]


def stage_outputs(stage: str, dvc_yaml: Path | str = "dvc.yaml") -> list[str]:
    """The paths a stage declares as outs, metrics and plots in dvc.yaml."""
    declared = _read_yaml(dvc_yaml).get("stages", {}).get(stage, {})
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in declared.get(kind, []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def pipeline_stages(dvc_yaml: Path | str = "dvc.yaml") -> list[str]:
    """The stage names of dvc.yaml, in order."""
    return list(_read_yaml(dvc_yaml).get("stages", {}))


def locked_outputs(dvc_lock: Path | str = "dvc.lock") -> dict[str, dict[str, str]]:
    """For each stage in dvc.lock, the md5 of each output it recorded."""
    stages = _read_yaml(dvc_lock).get("stages", {})
    return {
        name: {out["path"]: out["md5"] for out in stage.get("outs", []) if "md5" in out}
        for name, stage in stages.items()
    }


def locked_data_inputs(
    dvc_lock: Path | str = "dvc.lock", dvc_yaml: Path | str = "dvc.yaml"
) -> dict[str, str]:
    """The md5 dvc.lock records for every data input of the pipeline (the deps in dvc.yaml
    that are not code): from the stage that wrote it when it is an output (DVC records that as
    soon as the stage ends), else from the stage that read it."""
    declared = _read_yaml(dvc_yaml).get("stages", {}).values()
    inputs = {d for stage in declared for d in stage.get("deps", []) if not d.endswith(".py")}
    stages = _read_yaml(dvc_lock).get("stages", {}).values()
    found: dict[str, str] = {}
    for kind in ("deps", "outs"):  # outs last: they win
        for stage in stages:
            for entry in stage.get(kind, []):
                if entry["path"] in inputs and "md5" in entry:
                    found[entry["path"]] = entry["md5"]
    return dict(sorted(found.items()))


def git_state(outputs: list[str] = ()) -> tuple[str | None, bool]:
    """The commit checked out and whether tracked files differ from it, leaving out dvc.lock and
    ``outputs`` (a running pipeline rewrites those itself). (None, False) outside git."""
    run = {"capture_output": True, "text": True, "timeout": 30}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **run).stdout.strip()
        changed = subprocess.run(["git", "diff", "--name-only", "HEAD"], check=True, **run)
    except (OSError, subprocess.SubprocessError):
        return None, False
    ignored = ("dvc.lock", *outputs)
    dirty = any(
        not any(name == out or name.startswith(f"{out.rstrip('/')}/") for out in ignored)
        for name in changed.stdout.split()
    )
    return head, dirty


def experiment_baseline() -> str | None:
    """The commit a DVC experiment is based on (set by DVC for queued experiments)."""
    return os.environ.get("DVC_EXP_BASELINE_REV")
