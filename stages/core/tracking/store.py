"""Where MLflow stores runs: the store's URI, the experiment, and one line for a store that
fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.core.common.errors import one_line, redact
from stages.core.common.telemetry import MLFLOW_DEFAULTS, silence

silence()
for _key, _value in MLFLOW_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


# The user-info part of a URI (``scheme://user:token@host``): everything between ``//`` and the
# first ``@`` before the host ends (no ``/``, ``?``, ``#`` or blank in between).
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


@contextmanager
def local_store_lock() -> Iterator[None]:
    """Hold the local store's file lock while the block runs (nothing for any other store):
    parallel executions on one machine (`dvc queue start -j 2`) then take turns."""
    if tracking_uri() != local_store_uri():
        yield
        return
    from filelock import FileLock

    with FileLock(repo_root() / ".mlflow.db.lock"):
        yield


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (and the store's schema) when missing."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    if uri != local_store_uri():
        return _get_or_create_experiment(client, name, None)
    # Queued experiments (`dvc queue start -j 2`) may start on a fresh store at once: one
    # process creates the schema and the experiment while the others wait.
    with local_store_lock():
        # Artifacts of the local store sit beside it, not under whichever directory DVC ran in.
        return _get_or_create_experiment(client, name, (repo_root() / "mlartifacts").as_uri())


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        # On a shared server, stages of parallel executions (`dvc queue start -j 2`, or two
        # machines) may create it at once: one wins, the others use it.
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


# What a refused, silent or unknown host looks like deep inside MLflow's and urllib3's messages.
NETWORK_FAILURES = {
    "Connection refused": "connection refused (is the server running?)",
    "timed out": "no answer (timed out)",
    "Name or service not known": "unknown host",
    "Temporary failure in name resolution": "unknown host",
    "No route to host": "no route to host",
    "Connection aborted": "the server closed the connection (did it stop?)",
    "Connection reset": "the server closed the connection (did it stop?)",
    "Max retries exceeded": "no connection (is the server running?)",
}


def describe_failure(exc: BaseException) -> str:
    """One line for a tracking failure: the store, what went wrong, how to go on without it."""
    text = str(exc)
    reason = next((short for key, short in NETWORK_FAILURES.items() if key in text), None)
    if reason is None:
        message = one_line(text, 200)
        reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    # The whole line, for MLflow's own messages may quote the URI too.
    return redact(
        f"tracking: {tracking_uri()}: {reason} (to run without it: unset "
        "MLFLOW_TRACKING_URI to log to the local mlflow.db, or set PIPELINE_TRACKING=off)"
    )
