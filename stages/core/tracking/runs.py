"""The one tracking helper: where MLflow stores runs and how a stage logs to it.

A stage logs through a :class:`StageRun`. In a fresh stage process the MLflow work runs in a
background worker process (``python -m stages.core.tracking.worker``): importing mlflow and
opening the store cost about 2 s, which the worker spends on another core while the stage
imports torch and does its work. The stage sends what it logs without waiting, and waits for
the worker only when it ends. In a process that has imported mlflow already (a stage forked
by the warm server, tests, notebooks) the same operations run inline. Either way a tracking
failure stops the stage with one line (TrackingError), and what the stage logs is exactly what
the worker records: one :class:`Recorder` does the MLflow work in both cases."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from stages.core.common.errors import TrackingError
from stages.core.tracking.recorder import Recorder, numeric_metrics
from stages.core.tracking.store import describe_failure
from stages.core.tracking.worker import _import_quietly, _Worker, is_own_metrics

# How long an inline run holds its own metrics before it writes them: epochs shorter than this
# share one write (each is a store transaction: 200 one-epoch writes cost a fine-tune a CPU-second
# on SQLite), and an epoch longer than this is written as soon as it is sent.
INLINE_METRICS_EVERY_S = 1.0


class _Inline:
    """Operations run in this process, each as it is sent, but the run's own metrics, which
    wait at most ``INLINE_METRICS_EVERY_S`` (with their own timestamps) and go first whenever
    anything else is sent: the worker merges them the same way."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.closed = False
        self._metrics: list[tuple] = []  # (metrics, step, timestamp) not written yet
        self._written_at = time.monotonic()

    def send(self, operation: str, *args: Any) -> Any:
        own_metrics = is_own_metrics(operation, args)
        if own_metrics:
            self._metrics.append(args[:3])
            if time.monotonic() - self._written_at < INLINE_METRICS_EVERY_S:
                return None
        self.write_metrics()
        return None if own_metrics else self._run(operation, *args)

    def write_metrics(self) -> None:
        """Write the run's own metrics held so far."""
        if self._metrics:
            batches, self._metrics = self._metrics, []
            self._written_at = time.monotonic()
            self._run("log_metric_batches", batches)

    def _run(self, operation: str, *args: Any) -> Any:
        try:
            return getattr(self.recorder, operation)(*args)
        except Exception as exc:  # MLflow and its stores raise many types
            raise TrackingError(describe_failure(exc)) from None

    call = send

    def finish(self, status: str) -> tuple[str | None, list[str]]:
        """Close the run; returns its id and the notes of its operations."""
        self.closed = True
        return self.send("close", status)


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

    def epoch_logger(
        self, checkpoints=None, metrics: Callable[[Any], Mapping[str, Any]] | None = None
    ) -> Callable[[Any], None]:
        """fit's ``on_epoch``: ``log_epoch`` (or ``metrics(stats)`` at the epoch's step), and
        after an epoch that ``checkpoints`` saves (``checkpoints.due(epoch)``) everything logged
        so far is written at once: a stage killed after that save resumes after it and does
        not log those epochs again, so none may still be held (see ``INLINE_METRICS_EVERY_S``)."""

        def log(stats) -> None:
            if metrics is None:
                self.log_epoch(stats)
            else:
                self.log_metrics(metrics(stats), step=stats.epoch)
            if checkpoints is not None and checkpoints.due(stats.epoch):
                self._tracker.write_metrics()

        return log

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

    def write_metrics(self) -> None:
        return None

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
    another core meanwhile. The stage's ``stage_run`` then uses it. Only on rank 0 of a
    distributed run, and only with tracking on; a process that has imported mlflow (a stage
    forked by the warm server) logs inline and only runs the warm-ups here."""
    global _started
    if _started is not None or not tracking_enabled() or os.environ.get("RANK", "0") != "0":
        return
    if _inline_mode(None):
        # mlflow is imported already (a stage forked by the warm server): the stage logs
        # inline, so it needs no worker, only the warm-ups a worker would run.
        for target in preload:
            if ":" in target:
                _import_quietly(target)
        return
    _started = _Worker(tuple(preload))


def _as_mapping(params: Any) -> dict[str, Any] | None:
    """Params as plain data keyed as in params.yaml (a pydantic model is dumped by alias)."""
    if params is None:
        return None
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json", by_alias=True)
    return dict(params)


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
    pipeline_params: Any = None,
    background: bool | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage, named after it, holding the params it read (flattened).

    ``pipeline_params`` are every param of the execution (the stage's loaded params, a pydantic
    model or a mapping): the execution's parent run records them all, so tracking never reads
    params.yaml itself.

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
        every = _as_mapping(pipeline_params)
        tracker.send("open", stage, experiment, dict(params), resume_key, resuming, every)
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
