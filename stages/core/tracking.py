"""The one tracking helper: where MLflow stores runs and how a stage logs to it."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.core.telemetry import silence

silence()


def repo_root() -> Path:
    """The project root: ``DVC_ROOT`` (set by DVC for every stage), else the nearest parent
    holding ``.dvc``, else the working directory.

    Queued experiments run in copies under ``.dvc/tmp/exps/`` with ``DVC_ROOT`` still naming
    the real root, so their runs land in the project's own store.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((p for p in (cwd, *cwd.parents) if (p / ".dvc").is_dir()), cwd)


def local_store_uri() -> str:
    """The default store: a SQLite file at the repo root (absolute, so that experiments DVC
    runs in temporary copies log to the same store)."""
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the local store at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (and the store's schema) when missing."""
    import mlflow
    from filelock import FileLock

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri != local_store_uri():
        return _get_or_create_experiment(name, None)
    # Queued experiments (`dvc queue start -j 2`) may start on a fresh store at once: one
    # process creates the schema and the experiment while the others wait.
    with FileLock(repo_root() / ".mlflow.db.lock"):
        # Artifacts of the local store sit beside it, not under whichever directory DVC ran in.
        return _get_or_create_experiment(name, (repo_root() / "mlartifacts").as_uri())


def _get_or_create_experiment(name: str, artifact_location: str | None) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_location)


class StageRun:
    """What a stage logs: params once, metrics per epoch or at the end, artifacts."""

    def __init__(self, run):
        self.id = run.info.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log every numeric value of ``metrics`` (nested keys joined with '.') in one call."""
        import mlflow

        numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
        mlflow.log_metrics(numeric, step=step)

    def log_epoch(self, stats) -> None:
        """Per-epoch training metrics, in one call per epoch."""
        values = {k: v for k, v in vars(stats).items() if k != "epoch"}
        self.log_metrics(values, step=stats.epoch)

    def log_artifacts(self, *paths: Path | str, folder: str | None = None) -> None:
        import mlflow

        for path in map(Path, paths):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=folder or path.name)
            elif path.exists():
                mlflow.log_artifact(str(path), artifact_path=folder)


def _is_number(value: Any) -> bool:
    # numbers.Real covers numpy scalars too (pandas counts are np.int64).
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@contextmanager
def stage_run(
    stage: str, experiment: str, params: Mapping[str, Any], run_id: str | None = None
) -> Iterator[StageRun]:
    """An MLflow run for one stage, named after it, holding the params it read (flattened).

    ``run_id`` (a stage resumed from a checkpoint) continues that run, whose params are already
    logged; a run id the store does not know starts a new run.
    """
    import mlflow

    experiment_id = ensure_experiment(experiment)
    if run_id is not None and _known_run(run_id):
        with mlflow.start_run(run_id=run_id) as run:
            yield StageRun(run)
        return
    tags = {"stage": stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params({k: _param_value(v) for k, v in flatten(params).items()})
        yield StageRun(run)


def _known_run(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


def _param_value(value: Any) -> Any:
    return "null" if value is None else value
