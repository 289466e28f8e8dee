"""The one tracking helper: where MLflow stores runs and how a stage logs to it.

A stage logs through a :class:`StageRun`. In a fresh stage process the MLflow work runs in a
background worker process (``python -m stages.core.tracking``): importing mlflow and opening the
store cost about 2 s, which the worker spends on another core while the stage imports torch and
does its work. The stage sends what it logs without waiting, and waits for the worker only when
it ends. In a process that has imported mlflow already (tests, notebooks) the same operations
run inline. Either way a tracking failure stops the stage with one line (TrackingError), and
what the stage logs is exactly what the worker records: one :class:`Recorder` does the MLflow
work in both cases.
"""

from __future__ import annotations

import numbers
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from stages.core.errors import TrackingError
from stages.core.telemetry import silence

silence()

# A tracking server that is down or silent stops a stage in about 12 s, not MLflow's default of
# several minutes of retries: one retry, a 6 s timeout per attempt (users may override both).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "6"}
for _key, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

# How long a stage waits for the worker to finish logging after the stage's own work is done.
WORKER_EXIT_TIMEOUT = 300.0
# MLflow caps one log_batch call at 1000 metrics.
MAX_METRICS_PER_CALL = 1000


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


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of ``metrics``, nested keys joined with '.'; text and flags dropped."""
    # numbers.Real covers numpy scalars too (pandas counts are np.int64).
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def param_value(value: Any) -> str:
    """How a param reads in MLflow: ``null`` for None, else its text (lists as ``[128, 64]``)."""
    return "null" if value is None else str(value)


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (and the store's schema) when missing."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    if uri != local_store_uri():
        return _get_or_create_experiment(client, name, None)
    from filelock import FileLock

    # Queued experiments (`dvc queue start -j 2`) may start on a fresh store at once: one
    # process creates the schema and the experiment while the others wait.
    with FileLock(repo_root() / ".mlflow.db.lock"):
        # Artifacts of the local store sit beside it, not under whichever directory DVC ran in.
        return _get_or_create_experiment(client, name, (repo_root() / "mlartifacts").as_uri())


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


class Recorder:
    """The MLflow side of one stage run. Runs in the worker process or inline; every public
    method is an operation a StageRun can send."""

    def __init__(self) -> None:
        self.client = None
        self.run_id: str | None = None

    def open(self, stage: str, experiment: str, params: dict[str, Any], run_id: str | None) -> None:
        """Start the stage's run (or continue run ``run_id``) and log its params."""
        from mlflow import MlflowClient
        from mlflow.entities import Param

        experiment_id = ensure_experiment(experiment)
        self.client = MlflowClient(tracking_uri())
        tags = {"stage": stage}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        if run_id is None:
            run = self.client.create_run(experiment_id, run_name=stage, tags=tags)
            self.run_id = run.info.run_id
            flat = [Param(k, param_value(v)) for k, v in flatten(params).items()]
            for start in range(0, len(flat), 100):  # MLflow takes 100 params per call
                self.client.log_batch(self.run_id, params=flat[start : start + 100])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def current_run_id(self) -> str:
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        self.log_metric_batches([(metrics, step, timestamp)])

    def log_metric_batches(self, batches: list[tuple[dict[str, float], int | None, int]]) -> None:
        """Log ``(metrics, step, timestamp_ms)`` batches in as few calls as MLflow allows."""
        from mlflow.entities import Metric

        rows = [
            Metric(key, value, timestamp, step or 0)
            for metrics, step, timestamp in batches
            for key, value in metrics.items()
        ]
        for start in range(0, len(rows), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=rows[start : start + MAX_METRICS_PER_CALL])

    def log_artifacts(self, paths: list[str], folder: str | None) -> None:
        for path in map(Path, paths):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), folder or path.name)
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path), folder)

    def close(self, status: str) -> str | None:
        """End the run with ``status``; returns its id."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
        return self.run_id


def describe_failure(exc: BaseException) -> str:
    """One line for a tracking failure: the store, what went wrong, how to go on without it."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return (
        f"tracking: {tracking_uri()}: {message[:300]} "
        "(unset MLFLOW_TRACKING_URI to log to the local store mlflow.db)"
    )


class _Inline:
    """Operations run in this process, each as it is sent."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.closed = False

    def send(self, operation: str, *args: Any) -> Any:
        try:
            return getattr(self.recorder, operation)(*args)
        except Exception as exc:  # MLflow and its stores raise many types
            raise TrackingError(describe_failure(exc)) from None

    call = send

    def finish(self, status: str) -> str | None:
        """Close the run; returns its id."""
        self.closed = True
        return self.send("close", status)


class _Worker:
    """Operations sent to a worker process through a pipe; ``send`` does not wait."""

    def __init__(self) -> None:
        from multiprocessing.connection import Connection

        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stages.core.tracking", str(to_worker_r), str(from_worker_w)],
            pass_fds=(to_worker_r, from_worker_w),
            env=os.environ | {"PYTHONPATH": python_path},
            stdout=subprocess.DEVNULL,  # the stage's stdout is for the stage
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self.requests = Connection(to_worker_w, readable=False)
        self.replies = Connection(from_worker_r, writable=False)
        self.closed = False

    def _raise_if_failed(self) -> None:
        if self.replies.poll():
            self._receive()

    def _receive(self) -> Any:
        try:
            kind, value = self.replies.recv()
        except EOFError:
            raise TrackingError(
                f"tracking: the tracking worker exited with code {self.process.wait()}"
            ) from None
        if kind == "error":
            raise TrackingError(value)
        return value

    def send(self, operation: str, *args: Any) -> None:
        self._raise_if_failed()
        self.requests.send((operation, args, False))

    def call(self, operation: str, *args: Any) -> Any:
        self._raise_if_failed()
        self.requests.send((operation, args, True))
        return self._receive()

    def finish(self, status: str) -> str | None:
        """Close the run and wait for the worker to finish logging; returns the run id."""
        self.closed = True
        try:
            self.requests.send(("close", (status,), True))
            if not self.replies.poll(WORKER_EXIT_TIMEOUT):
                raise TrackingError(
                    f"tracking: {tracking_uri()}: no answer in {WORKER_EXIT_TIMEOUT:.0f} s"
                )
            return self._receive()
        finally:
            self.requests.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _serve(requests_fd: int, replies_fd: int) -> None:
    """The worker: run the operations a stage sends, in order, until it closes the run.

    Metrics sent one epoch at a time are merged into as few MLflow calls as possible. After a
    failure the worker reports it once and skips everything but the final close.
    """
    import queue
    import threading
    from multiprocessing.connection import Connection

    requests = Connection(requests_fd, writable=False)
    replies = Connection(replies_fd, readable=False)
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        # Drain the pipe at once, so that a stage never blocks on a full pipe while the
        # worker is still importing mlflow.
        while True:
            try:
                inbox.put(requests.recv())
            except EOFError:
                inbox.put(None)  # the stage died without closing: the run is KILLED
                return

    threading.Thread(target=read, daemon=True).start()
    recorder = Recorder()
    failure: str | None = None
    while True:
        message = inbox.get()
        if message is None:
            message = ("close", ("KILLED",), False)
        operation, args, wants_reply = message
        if operation == "log_metrics":
            batches = [args]
            while not inbox.empty() and inbox.queue[0] and inbox.queue[0][0] == "log_metrics":
                batches.append(inbox.get()[1])
            operation, args = "log_metric_batches", (batches,)
        result = None
        if failure is None or operation == "close":
            try:
                result = getattr(recorder, operation)(*args)
            except Exception as exc:  # reported to the stage as one line
                if failure is None:
                    failure = describe_failure(exc)
                    replies.send(("error", failure))
        if wants_reply:
            replies.send(("error", failure) if failure else ("ok", result))
        if operation == "close":
            return


class StageRun:
    """What a stage logs: params once, metrics per epoch or at the end, artifacts."""

    def __init__(self, tracker: _Inline | _Worker) -> None:
        self._tracker = tracker
        self._id: str | None = None

    @property
    def id(self) -> str:
        """The MLflow run id (waits for the run to exist)."""
        if self._id is None:
            self._id = self._tracker.call("current_run_id")
        return self._id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log every numeric value of ``metrics`` (nested keys joined with '.') in one call."""
        timestamp = int(time.time() * 1000)
        self._tracker.send("log_metrics", numeric_metrics(metrics), step, timestamp)

    def log_epoch(self, stats) -> None:
        """Per-epoch training metrics, in one call per epoch."""
        values = {k: v for k, v in vars(stats).items() if k != "epoch"}
        self.log_metrics(values, step=stats.epoch)

    def log_artifacts(self, *paths: Path | str, folder: str | None = None) -> None:
        self._tracker.send("log_artifacts", [str(p) for p in paths], folder)


def _inline_mode(background: bool | None) -> bool:
    # A process that has imported mlflow already pays nothing more for logging inline.
    return not background if background is not None else "mlflow" in sys.modules


@contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    run_id: str | None = None,
    background: bool | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage, named after it, holding the params it read (flattened).

    ``run_id`` continues an existing run instead (a resumed stage). ``background`` forces the
    worker process (True) or inline logging (False); by default a process that has not imported
    mlflow uses the worker.
    """
    tracker = _Inline() if _inline_mode(background) else _Worker()
    run = StageRun(tracker)
    try:
        tracker.send("open", stage, experiment, dict(params), run_id)
        yield run
        run._id = tracker.finish("FINISHED")
    except BaseException:
        if not tracker.closed:
            with suppress(TrackingError):  # the stage's own error is the one to report
                tracker.finish("FAILED")
        raise


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
