"""The tracking worker process: a stage sends it operations through a pipe and waits for it
only at its end."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from stages.core.common.errors import TrackingError
from stages.core.common.warm_start import STAGE_PID, ForkedProcess, Unanswered, fork_worker
from stages.core.tracking.recorder import Recorder
from stages.core.tracking.store import describe_failure, redact, tracking_uri

# How long a stage waits for the worker to finish logging after the stage's own work is done.
WORKER_EXIT_TIMEOUT = 300.0


class _Worker:
    """Operations sent to a worker process through a pipe; ``send`` does not wait."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        from multiprocessing.connection import Connection

        package_root = str(Path(__file__).resolve().parents[3])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        # A forked stage has it already: the process DVC started, its stand-in.
        stage_pid = os.environ.get(STAGE_PID) or str(os.getpid())
        env = os.environ | {"PYTHONPATH": python_path, STAGE_PID: stage_pid}
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        try:
            # Forked by the warm server (imports done) when one runs; else a process of its own.
            forked = fork_worker(
                f"{__name__}:_serve", to_worker_r, from_worker_w, preload, package_root, env
            )
        except Unanswered:
            # It may have forked a worker on these pipes: new ones, and that worker, if any,
            # sees its requests pipe close and exits without a run.
            for fd in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
                os.close(fd)
            to_worker_r, to_worker_w = os.pipe()
            from_worker_r, from_worker_w = os.pipe()
            forked = None
        self.process: ForkedProcess | subprocess.Popen = forked or subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.core.tracking.worker",
                str(to_worker_r),
                str(from_worker_w),
                *preload,
            ],  # fmt: skip
            pass_fds=(to_worker_r, from_worker_w),
            env=env,
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
            code = self.process.wait()  # None for a forked worker: not this process's child
            detail = "" if code is None else f" with code {code}"
            raise TrackingError(f"tracking: the tracking worker exited{detail}") from None
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

    def write_metrics(self) -> None:
        """Nothing to do: the worker writes what it is sent, and outlives a killed stage."""

    def finish(self, status: str) -> tuple[str | None, list[str]]:
        """Close the run and wait for the worker to finish logging; returns the run id and
        the notes of its operations."""
        self.closed = True
        try:
            self.requests.send(("close", (status,), True))
            if not self.replies.poll(WORKER_EXIT_TIMEOUT):
                raise TrackingError(
                    f"tracking: {redact(tracking_uri())}: no answer in {WORKER_EXIT_TIMEOUT:.0f} s"
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


def is_own_metrics(operation: str, args: tuple) -> bool:
    """Whether ``operation(*args)`` logs the run's own metrics (not also the parent's): those
    may wait and share one write with the ones after them."""
    return operation == "log_metrics" and not args[3]


def _is_own_metrics(message) -> bool:
    return bool(message) and is_own_metrics(message[0], message[1])


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


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
