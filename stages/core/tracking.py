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
import warnings
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
# No progress bars from artifact copies in the stage's log.
QUIET_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
for _key, _value in (HTTP_DEFAULTS | QUIET_DEFAULTS).items():
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


class Recorder:
    """The MLflow side of one stage run. Runs in the worker process or inline; every public
    method is an operation a StageRun can send.

    Inside a DVC execution the stage run is the child of one parent run per execution (see
    stages.core.lineage.execution_key): the parent holds every param, the commit, the data md5s,
    the final metrics, and for each stage the run that produced its outputs (``run.<stage>``
    when it ran in this execution, ``cached.<stage>`` when DVC skipped it).
    """

    def __init__(self) -> None:
        self.client = None
        self.stage: str | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.fluent = False  # whether the run is also mlflow's active run (for log_model)
        self._git: tuple[str | None, bool] | None = None
        self.registered: tuple[str, int] | None = None  # the model version evaluate registered
        self.notes: list[str] = []  # lines for the stage to print when it ends

    def open(
        self,
        stage: str,
        experiment: str,
        params: dict[str, Any],
        resume_key: str | None = None,
        resuming: bool = False,
    ) -> None:
        """Start the stage's run and log its params; tagged ``resume.key`` with ``resume_key``.

        ``resuming``: the stage resumes a checkpoint; the run it was logging to, the newest run
        of this stage with the same key, continues (a new run when the store has none).
        """
        import mlflow

        from stages.core.lineage import execution_key

        _quiet_mlflow()
        self.experiment_id = ensure_experiment(experiment)
        # MLflow resolves some URIs through its global tracking URI, not a client's (a logged
        # model's models:/m-... when a version is registered from it): make it this store, not
        # MLflow's default relative to the working directory (a queued experiment's copy).
        mlflow.set_tracking_uri(tracking_uri())
        self.client = mlflow.MlflowClient(tracking_uri())
        self.stage = stage
        key = execution_key()
        if key is not None:
            self.parent_id = self._parent(key)
        if resuming and resume_key:
            self.run_id = self._resumable(resume_key)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"stage": stage, **self.context_tags()}
            if resume_key:
                tags["resume.key"] = resume_key
            if self.parent_id:
                tags["mlflow.parentRunId"] = self.parent_id
            run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(self.run_id, params)
        if self.parent_id:
            self._tag_parent_at_open()

    def _resumable(self, resume_key: str) -> str | None:
        """The newest run of this stage tagged with ``resume_key``."""
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.stage = '{self.stage}' and tags.`resume.key` = '{resume_key}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return found[0].info.run_id if found else None

    def context_tags(self) -> dict[str, str]:
        """The commit (a DVC experiment's baseline), whether the code or params differ from it,
        and the DVC experiment's name."""
        from stages.core.lineage import experiment_baseline, git_state, stage_outputs

        if self._git is None and self.parent_id:
            # One execution, one checkout: the parent recorded it when the first stage ran.
            parent = self.client.get_run(self.parent_id).data.tags
            if "git.dirty" in parent:
                self._git = (parent.get("git.commit"), parent["git.dirty"] == "true")
        if self._git is None:
            outputs = [p for s in _pipeline_stages() for p in stage_outputs(s)]
            self._git = git_state(outputs)
        commit, dirty = self._git
        commit = experiment_baseline() or commit
        tags = {"git.dirty": str(dirty).lower()}
        if commit:
            tags |= {"git.commit": commit, "mlflow.source.git.commit": commit}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        return tags

    def _parent(self, key: str) -> str:
        """This execution's parent run, created by its first stage."""
        from stages.core.params import load_params

        found = self.client.search_runs(
            [self.experiment_id], f"tags.`pipeline.execution` = '{key}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        tags = self.context_tags()
        name = f"{os.environ.get('DVC_EXP_NAME') or 'workspace'}@{tags.get('git.commit', '')[:7]}"
        tags |= {"pipeline.execution": key, "pipeline.role": "parent"}
        parent = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._log_params(parent.info.run_id, load_params().model_dump(mode="json", by_alias=True))
        if Path("params.yaml").is_file():
            self.client.log_artifact(parent.info.run_id, "params.yaml")
        return parent.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, param_value(v)) for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes 100 params per call
            self.client.log_batch(run_id, params=flat[start : start + 100])

    def _tag_parent_at_open(self) -> None:
        from stages.core.lineage import locked_data_inputs

        self.client.update_run(self.parent_id, status="RUNNING")
        self.client.set_tag(self.parent_id, f"run.{self.stage}", self.run_id)
        if f"cached.{self.stage}" in self.client.get_run(self.parent_id).data.tags:
            self.client.delete_tag(self.parent_id, f"cached.{self.stage}")
        # The data inputs as dvc.lock records them: current for every stage DVC has run
        # before this one in this execution.
        for path, md5 in locked_data_inputs().items():
            self.client.set_tag(self.parent_id, f"dvc.md5.{path}", md5)

    def current_run_id(self) -> str:
        return self.run_id

    def log_metrics(
        self, metrics: dict[str, float], step: int | None, timestamp: int, parent: bool = False
    ) -> None:
        self.log_metric_batches([(metrics, step, timestamp)])
        if parent and self.parent_id:
            self._log_metric_rows(self.parent_id, [(metrics, step, timestamp)])

    def log_metric_batches(self, batches: list[tuple[dict[str, float], int | None, int]]) -> None:
        """Log ``(metrics, step, timestamp_ms)`` batches in as few calls as MLflow allows."""
        self._log_metric_rows(self.run_id, batches)

    def _log_metric_rows(self, run_id: str, batches) -> None:
        from mlflow.entities import Metric

        rows = [
            Metric(key, value, timestamp, step or 0)
            for metrics, step, timestamp in batches
            for key, value in metrics.items()
        ]
        for start in range(0, len(rows), MAX_METRICS_PER_CALL):
            self.client.log_batch(run_id, metrics=rows[start : start + MAX_METRICS_PER_CALL])

    def log_artifacts(self, paths: list[str], folder: str | None, parent: bool = False) -> None:
        run_ids = [self.run_id] + ([self.parent_id] if parent and self.parent_id else [])
        for run_id in run_ids:
            for path in map(Path, paths):
                if path.is_dir():
                    self.client.log_artifacts(run_id, str(path), folder or path.name)
                elif path.exists():
                    self.client.log_artifact(run_id, str(path), folder)

    def log_dataset(self, path: str, context: str, name: str) -> None:
        """Record a parquet split the stage read as a dataset input, with DVC's md5 as its
        digest (MLflow's own digest hashes only the first 10,000 rows)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        from stages.core.lineage import dvc_md5

        frame = pd.read_parquet(path)
        with warnings.catch_warnings():
            # MLflow hints that integer labels cannot hold missing values (ours never do),
            # and that a local path could be one of two kinds of source (it is a file).
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                frame, source=path, name=name, targets="label", digest=dvc_md5(path)
            )._to_mlflow_entity()
        dataset_input = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(self.run_id, datasets=[dataset_input])

    def run_operation(self, operation, *args: Any) -> Any:
        """Run ``operation(self, *args)``: a module-level function of another core module (such
        as stages.core.registry), which the stage names and this process imports."""
        return operation(self, *args)

    def activate(self) -> None:
        """Make the stage's run mlflow's active run, for APIs that log to the active run."""
        import mlflow

        if not self.fluent:
            mlflow.start_run(run_id=self.run_id)
            self.fluent = True

    def parent_tags(self) -> dict[str, str]:
        """The parent run's tags (empty outside a DVC execution)."""
        return self.client.get_run(self.parent_id).data.tags if self.parent_id else {}

    def close(self, status: str) -> tuple[str | None, list[str]]:
        """End the run with ``status``; record its outputs' md5s and, on the parent, which
        run produced each stage's outputs. Returns the run id and the notes for the stage."""
        if self.run_id is None:
            return None, self.notes
        if status == "FINISHED":
            self._tag_outputs()
        if self.parent_id:
            self._tag_lineage()
            self.client.set_terminated(self.parent_id, status)
        if self.fluent:
            import mlflow

            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.run_id, status)
        return self.run_id, self.notes

    def _tag_outputs(self) -> None:
        from stages.core.lineage import dvc_md5, stage_outputs

        for path in stage_outputs(self.stage):
            if Path(path).exists():
                self.client.set_tag(self.run_id, f"dvc.out.{path}", dvc_md5(path))

    def _tag_lineage(self) -> None:
        """For each stage DVC did not run in this execution, the earlier run that produced the
        outputs dvc.lock records for it, found by their md5 (``cached.<stage>``)."""
        from stages.core.lineage import locked_outputs

        tags = self.client.get_run(self.parent_id).data.tags
        for stage, outputs in locked_outputs().items():
            if f"run.{stage}" in tags or not outputs:
                continue
            producer = self._run_with_outputs(stage, outputs) or "unknown"
            self.client.set_tag(self.parent_id, f"cached.{stage}", producer)

    def producer(self, stage: str) -> str | None:
        """The run that produced ``stage``'s outputs now on disk: its run in this execution,
        else the newest finished run that recorded the same md5 (None when the store has none,
        e.g. the stage ran with tracking off)."""
        from stages.core.lineage import dvc_md5, stage_outputs

        ran = self.parent_tags().get(f"run.{stage}")
        if ran:
            return ran
        path = next((p for p in stage_outputs(stage) if Path(p).exists()), None)
        return self._run_with_outputs(stage, {path: dvc_md5(path)}) if path else None

    def _run_with_outputs(self, stage: str, outputs: dict[str, str]) -> str | None:
        path, md5 = next(iter(outputs.items()))
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.stage = '{stage}' and tags.`dvc.out.{path}` = '{md5}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return found[0].info.run_id if found else None


def _quiet_mlflow() -> None:
    """MLflow's info lines and hints are not for a pipeline's log; its warnings stay."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _pipeline_stages() -> list[str]:
    from stages.core.lineage import pipeline_stages

    return pipeline_stages()


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
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        reason = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
    return (
        f"tracking: {tracking_uri()}: {reason} (to run without it: unset "
        "MLFLOW_TRACKING_URI to log to the local mlflow.db, or set PIPELINE_TRACKING=off)"
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

    def finish(self, status: str) -> tuple[str | None, list[str]]:
        """Close the run; returns its id and the notes of its operations."""
        self.closed = True
        return self.send("close", status)


class _Worker:
    """Operations sent to a worker process through a pipe; ``send`` does not wait."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        from multiprocessing.connection import Connection

        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.core.tracking",
                str(to_worker_r),
                str(from_worker_w),
                *preload,
            ],  # fmt: skip
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

    def finish(self, status: str) -> tuple[str | None, list[str]]:
        """Close the run and wait for the worker to finish logging; returns the run id and
        the notes of its operations."""
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


def _import_quietly(target: str) -> None:
    """Import ``module``, or for ``module:function`` also call it (a warm-up of its own)."""
    import importlib

    module, _, function = target.partition(":")
    with suppress(Exception):  # a step that fails here fails again where it is needed
        imported = importlib.import_module(module)
        if function:
            getattr(imported, function)()


def _is_own_metrics(message) -> bool:
    return bool(message) and message[0] == "log_metrics" and not message[1][3]


def _serve(requests_fd: int, replies_fd: int, preload: list[str]) -> None:
    """The worker: run the operations a stage sends, in order, until it closes the run.

    It starts while the stage is still importing its own libraries: it imports mlflow and the
    ``preload`` modules (what later operations need: torch and MLflow's pyfunc for a model) at
    once. Metrics sent one epoch at a time are merged into as few MLflow calls as possible.
    After a failure the worker reports it once and skips everything but the final close. A
    stage that ends without opening a run (it failed first, or it only relaunched itself)
    leaves nothing behind.
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
    for module in preload:
        threading.Thread(target=_import_quietly, args=(module,), daemon=True).start()
    _import_quietly("mlflow")
    recorder = Recorder()
    failure: str | None = None
    while True:
        message = inbox.get()
        if message is None:
            if recorder.run_id is None:
                os._exit(0)  # no run to end
            message = ("close", ("KILLED",), False)
        operation, args, wants_reply = message
        if _is_own_metrics(message):  # the stage's own metrics
            batches = [args[:3]]
            while not inbox.empty() and _is_own_metrics(inbox.queue[0]):
                batches.append(inbox.get()[1][:3])
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
            # Everything is recorded: skip the interpreter's teardown of mlflow, SQLAlchemy and
            # torch (about a second), which the stage would otherwise wait for.
            os._exit(0)


class StageRun:
    """What a stage logs: params once, metrics per epoch or at the end, artifacts, datasets,
    and operations of other modules (models, registry). Every call returns at once but ``id``
    and ``call``."""

    def __init__(self, tracker: _Inline | _Worker | _Off) -> None:
        self._tracker = tracker
        self._id: str | None = None
        self.notes: list[str] = []  # what the operations had to say, once the run has ended

    @property
    def id(self) -> str | None:
        """The MLflow run id (waits for the run to exist); None with tracking off."""
        if self._id is None:
            self._id = self._tracker.call("current_run_id")
        return self._id

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, parent: bool = False
    ) -> None:
        """Log every numeric value of ``metrics`` (nested keys joined with '.') in one call;
        ``parent`` logs them on the execution's parent run too (the final figures)."""
        timestamp = int(time.time() * 1000)
        self._tracker.send("log_metrics", numeric_metrics(metrics), step, timestamp, parent)

    def log_epoch(self, stats) -> None:
        """Per-epoch training metrics, in one call per epoch."""
        values = {k: v for k, v in vars(stats).items() if k != "epoch"}
        self.log_metrics(values, step=stats.epoch)

    def log_artifacts(
        self, *paths: Path | str, folder: str | None = None, parent: bool = False
    ) -> None:
        """Files and folders as artifacts (folders keep their name); ``parent`` also puts them
        on the execution's parent run."""
        self._tracker.send("log_artifacts", [str(p) for p in paths], folder, parent)

    def log_dataset(self, path: Path | str, context: str) -> None:
        """A split the stage read (``training``, ``validation``, ``test``), digest = DVC md5."""
        self._tracker.send("log_dataset", str(path), context, Path(path).stem)

    def send(self, operation, *args: Any) -> None:
        """Run ``operation(recorder, *args)`` where MLflow runs, without waiting (see
        Recorder.run_operation)."""
        self._tracker.send("run_operation", operation, *args)

    def call(self, operation, *args: Any) -> Any:
        """Run ``operation(recorder, *args)`` where MLflow runs, and return its result (None
        with tracking off)."""
        return self._tracker.call("run_operation", operation, *args)


class _Off:
    """``PIPELINE_TRACKING=off``: nothing is logged."""

    closed = False

    def send(self, operation: str, *args: Any) -> None:
        return None

    call = send

    def finish(self, status: str) -> tuple[None, list[str]]:
        self.closed = True
        return None, []


def tracking_enabled() -> bool:
    """False when ``PIPELINE_TRACKING=off``: stages then run without any tracking store."""
    return os.environ.get("PIPELINE_TRACKING", "on").lower() not in ("off", "0", "false")


_started: _Worker | None = None  # started by start_worker() before the stage's imports


def start_worker(*preload: str) -> None:
    """Start the tracking worker now, before the stage imports its libraries (call it at the
    top of a stage's ``__main__``): it imports mlflow, and the ``preload`` modules that the
    stage's later operations need (``module:function`` also calls a warm-up function), on
    another core meanwhile. The stage's ``stage_run`` then
    uses it. Only on rank 0 of a distributed run, and only with tracking on."""
    global _started
    if _started is None and tracking_enabled() and os.environ.get("RANK", "0") == "0":
        _started = _Worker(tuple(preload))


def _inline_mode(background: bool | None) -> bool:
    # A process that has imported mlflow already pays nothing more for logging inline.
    return not background if background is not None else "mlflow" in sys.modules


@contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    resume_key: str | None = None,
    resuming: bool = False,
    *,
    background: bool | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage, named after it, holding the params it read (flattened).

    A stage that checkpoints passes its checkpoint fingerprint as ``resume_key``; when it
    resumes a checkpoint (``resuming``) it continues the run it was logging to before it was
    killed. ``background`` forces the worker process (True) or inline logging (False); by
    default a process that has not imported mlflow uses the worker (the one start_worker
    started, if any).
    """
    if not tracking_enabled():
        tracker = _Off()
    elif _inline_mode(background):
        tracker = _Inline()
    else:
        global _started
        tracker, _started = (_started or _Worker()), None
    run = StageRun(tracker)
    try:
        tracker.send("open", stage, experiment, dict(params), resume_key, resuming)
        yield run
        run._id, run.notes = tracker.finish("FINISHED")
    except BaseException:
        if not tracker.closed:
            with suppress(TrackingError):  # the stage's own error is the one to report
                run._id, run.notes = tracker.finish("FAILED")
        raise
    finally:
        for note in run.notes:  # what the operations had to say (the registry's decision)
            print(f"{stage}: {note}", flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
