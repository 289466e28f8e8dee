"""The warm server: one process imports torch, pandas, scikit-learn, Great Expectations,
transformers and mlflow once, then forks each later stage and each stage's tracking worker,
which so start with them imported instead of spending 1-6 s of CPU importing them (more than
most stages spend on their work). The stage's side (when to hand over, the server's key, the
stand-in) is stages/core/common/warm_start.py; what a user sees is in docs/outputs.md, "Warm
starts".

For a stage, the server forks a supervisor, which forks the stage in a process group of its
own, with the stage's stdin, stdout and stderr, environment, working folder, umask,
``sys.path``, arguments and ignored signals; the stage starts on the stand-in's go-ahead, runs
its module as ``__main__`` the way ``python -m`` does, and its exit status (or the signal that
killed it) goes back to the stand-in. The supervisor passes on the signals the stand-in sends,
and kills the stage's group if the stand-in dies. For a tracking worker, the server forks it
on the stage's two pipe ends and answers with its pid and a pidfd.

A forked stage or worker runs the same code as a plain one, imported after the fork from the
stage's own checkout: an edit under stages/ never needs a restart, and one server serves
every checkout. So this file imports nothing of this package: the server runs it as a script
(``python -P warm_server.py``), and a server's key includes the bytes of this file and of
warm_start.py, so a stage only ever talks to a server of its own version.

A server exits after ``PIPELINE_WARM_SERVER_IDLE`` seconds (default 300) without a request;
``PIPELINE_WARM_SERVER_PRELOAD`` changes what it imports (see PRELOAD_VAR).
Linux only (abstract unix sockets, pidfds); only processes of the server's own user are
served.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys

IDLE = "PIPELINE_WARM_SERVER_IDLE"
DEFAULT_IDLE_S = 300.0
# Modules, comma-separated, instead of PRELOAD ("" preloads nothing); with a leading "+", in
# addition to it (the libraries of a user's own stages).
PRELOAD_VAR = "PIPELINE_WARM_SERVER_PRELOAD"
# What the stages and their tracking workers import (each only what it uses, at its own cost
# when the server lacks it): mlflow and its stores for every worker; torch, pandas and
# MLflow's pyfunc and evaluation for the workers that log, load and evaluate models; the
# stages' libraries (the optimizer imports torch._dynamo; transformers is lazy, so its auto
# classes are named). Not matplotlib: it reads ./matplotlibrc from the folder it is imported in.
PRELOAD = (
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.pyfunc",
    "mlflow.models.evaluation.default_evaluator",
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "pandas",
    "pyarrow.parquet",
    "pyarrow.dataset",
    "psutil",
    "sklearn.datasets",
    "sklearn.model_selection",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.pipeline",
    "sklearn.preprocessing",
    "sklearn.feature_extraction.text",
    "scipy.stats",
    "great_expectations",
    "great_expectations.execution_engine",
    "tokenizers",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "peft",
)
# How long a stage waits for the server to fork its worker or itself (it answers in ms).
ANSWER_TIMEOUT_S = 30.0
# The signals a stage's stand-in passes on to the stage's process group, unless it ignores
# them (as under nohup), in which case the stage ignores them too. Ctrl-Z (SIGTSTP) stops
# the stage, then the stand-in; SIGCONT (`fg`) goes on to the stage.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")
FORWARDED += ("SIGWINCH", "SIGTSTP")
GO = b"\0"  # the stand-in's go-ahead: no signal is 0
HEADER = struct.Struct("!Q")  # a request: its length, then its JSON
PID = struct.Struct("!i")  # an answer: the forked pid (0: refused)
STATUS = struct.Struct("!i")  # a stage's end: os.waitstatus_to_exitcode


# The thread count torchrun sets for its ranks (1), and many a user in a shell: as a whole
# number it is the stage's own, not its server's (so a distributed stage's ranks fork from the
# server every other stage uses). A server starts without it, and a fork takes the stage's the
# way a fresh process takes it at start: torch's intra-op threads, the BLAS and OpenMP pools.
THREADS = "OMP_NUM_THREADS"


def thread_count(env: dict[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` of ``env`` when it is a whole number above 0 (the stage's own, see
    THREADS); None otherwise (unset, or a form such as ``4,2`` that only a fresh process reads
    as OpenMP does)."""
    value = env.get(THREADS, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def preload_modules(env: dict[str, str]) -> tuple[str, ...]:
    """What a server imports before it serves: PRELOAD, or what ``PIPELINE_WARM_SERVER_PRELOAD``
    names (see PRELOAD_VAR)."""
    value = env.get(PRELOAD_VAR)
    if value is None:
        return PRELOAD
    value = value.strip()
    named = tuple(name.strip() for name in value.removeprefix("+").split(",") if name.strip())
    return PRELOAD + named if value.startswith("+") else named


def idle_seconds(env: dict[str, str]) -> float:
    """``PIPELINE_WARM_SERVER_IDLE`` as a positive number of seconds, else the default."""
    try:
        seconds = float(env.get(IDLE) or DEFAULT_IDLE_S)
    except ValueError:
        return DEFAULT_IDLE_S
    return seconds if 0 < seconds < float("inf") else DEFAULT_IDLE_S


def peer_uid(sock: socket.socket) -> int:
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the warm server closed the connection")
        data += chunk
    return data


def _become(request: dict) -> None:
    """In a forked child: take the stage's environment and working folder."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # Python's random reseeds itself in a forked child; numpy does not (a fresh process
    # seeds it from the OS; torch's default seed is fixed, as in a fresh process).
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = thread_count(request["env"])
    if threads is not None:
        _use_threads(threads)


def _use_threads(count: int) -> None:
    """What ``OMP_NUM_THREADS=count`` gives a fresh process: torch's intra-op threads, and the
    BLAS and OpenMP pools of the libraries loaded (threadpoolctl, which scikit-learn brings)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    with contextlib.suppress(Exception):  # no threadpoolctl: numpy's BLAS keeps its pool
        from threadpoolctl import threadpool_limits

        threadpool_limits(count)


def _run_worker(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage's worker, then exit (never returns)."""
    try:
        requests_fd, replies_fd, stderr_fd = fds
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        _become(request)
        sys.path.insert(0, request["root"])
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        import importlib

        module, _, function = request["entry"].partition(":")
        serve = getattr(importlib.import_module(module), function)
        serve(requests_fd, replies_fd, request["preload"])
    except BaseException:
        import traceback

        traceback.print_exc()  # onto the stage's stderr
    finally:
        os._exit(1)  # the worker exits on its own; this is for a failure before it


def _supervise_stage(conn: socket.socket, request: dict, fds: list[int]) -> object:
    """In the forked supervisor: fork the stage in a process group of its own, tell the
    stand-in its pid, let the stage start on the stand-in's go-ahead, pass on the signals the
    stand-in sends, kill the stage's group if the stand-in dies, and send the stage's exit
    status (``os.waitstatus_to_exitcode``: minus the signal that killed it). Never returns in
    the supervisor; returns what ``_run_stage`` does in the stage."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        conn.close()
        os.close(go_write)
        os.setpgid(0, 0)
        if os.read(go_read, 1) != GO:  # the stand-in gave up: never run
            os._exit(1)
        os.close(go_read)
        return _run_stage(request, fds)
    try:
        os.close(go_read)
        with contextlib.suppress(OSError):  # (the stage did it first)
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        conn.sendall(PID.pack(pid))
        watched, started = [conn, pidfd], False
        while True:
            ready = select.select(watched, [], [])[0]
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
                os._exit(0)
            signals = conn.recv(64)
            if not signals:  # the stand-in died (DVC's process group killed): so does the stage
                watched.remove(conn)
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            if not started and signals[:1] == GO:
                started, signals = True, signals[1:]
                os.write(go_write, GO)
            for signum in signals:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signum)
    except BaseException:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # never a stage without its supervisor
        os._exit(1)


# What _run_stage returns for an uncaught KeyboardInterrupt: the process dies of SIGINT.
INTERRUPTED = object()


def _run_stage(request: dict, fds: list[int]) -> object:
    """In the forked stage: take the stage's streams, environment, folder, umask, path and
    arguments, run its module as ``__main__`` the way ``python -m`` does, and return the exit
    code Python would give (``INTERRUPTED`` for an uncaught KeyboardInterrupt)."""
    import io
    import runpy
    import traceback

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # nothing of the server's goes into the stage's streams
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    _become(request)
    for name in FORWARDED:  # as in the stand-in: ignored there, ignored here
        signum = getattr(signal, name)
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, signal.SIG_IGN if signum in request["ignored"] else default)
    os.umask(request["umask"])
    sys.path[:] = request["path"]
    # As Python sets them up: `-u` or PYTHONUNBUFFERED leave stdout and stderr unbuffered; else
    # stderr is line-buffered, and stdout too on a terminal.
    unbuffered = request["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))
    streams = {}
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        raw = fd != 0 and unbuffered
        stream = io.TextIOWrapper(
            open(fd, "rb" if fd == 0 else "wb", buffering=0 if raw else -1, closefd=False),  # noqa: SIM115
            encoding=old.encoding,
            errors=old.errors,
            newline="\n" if fd == 0 else None,
            line_buffering=fd != 0 and (fd == 2 or os.isatty(fd)),
            write_through=raw,
        )
        streams[name] = stream
    sys.stdin = sys.__stdin__ = streams["stdin"]
    sys.stdout = sys.__stdout__ = streams["stdout"]
    sys.stderr = sys.__stderr__ = streams["stderr"]
    sys.argv = [request["module"], *request["args"]]  # run_module sets argv[0] to its file
    code: object = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        traceback.print_exc()
        return INTERRUPTED
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # what Python does with sys.exit("message")
        code = 1
    return code


def _serve_requests(name: str) -> object:
    """The server: claim the name, preload, listen, and fork one worker or stage per request
    until idle. Stages that ask while it preloads find it not listening yet and start the
    plain way (and a server that exits at once: the name is taken). A server that finds it
    cannot fork safely keeps the name, refusing every request, until idle: the stages then
    start the plain way without starting servers again. Returns None in the server, and what
    ``_run_stage`` returns in a forked stage."""
    import gc
    import importlib
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(name)
    except OSError:  # another stage started the same server first
        return None
    os.chdir("/")  # hold no stage's folder
    for module in preload_modules(dict(os.environ)):
        with contextlib.suppress(Exception):  # a stage that needs it fails the plain way
            importlib.import_module(module)
    # Forking a process with other threads is unsafe (a lock one of them holds stays held),
    # and a CUDA context does not survive a fork (no import should make one; if one did, a
    # stage on the GPU would fail).
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_initialized()
    refusing = threading.active_count() != 1 or cuda
    # Out of the garbage collector's sight: a full collection in a forked stage would walk
    # (and so copy) every preloaded object, about 0.6 s of CPU for 800k objects.
    gc.collect()
    gc.freeze()
    listener.listen(16)
    listener.settimeout(idle_seconds(dict(os.environ)))
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return None
        with conn:
            if refusing or peer_uid(conn) != os.getuid():  # only this user's stages
                with contextlib.suppress(OSError):
                    conn.sendall(PID.pack(0))  # refused: the stage starts the plain way
            else:
                code = _answer(conn, listener)
                if code is not None:  # in the forked stage, which is done
                    return code
        with contextlib.suppress(ChildProcessError):  # reap what has exited
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def _answer(conn: socket.socket, listener: socket.socket) -> object:
    """Read one request from ``conn``. For a worker: fork it and answer with its pid and a
    pidfd (opened before the worker can be reaped, so it names that worker and no later
    process). For a stage: fork its supervisor, which answers. Returns None in the server,
    and what ``_run_stage`` returns in a forked stage."""
    conn.settimeout(ANSWER_TIMEOUT_S)
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        if len(header) != HEADER.size or len(fds) != 3:
            raise ValueError("a malformed request")
        (size,) = HEADER.unpack(header)
        request = json.loads(receive_exactly(conn, size))
        if not isinstance(request, dict) or request.get("kind") not in ("stage", "worker"):
            raise ValueError("a malformed request")
        pid = os.fork()
    except (OSError, ValueError):  # (a fork that failed: the stage runs the plain way)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(PID.pack(0))
        return None
    if pid == 0:
        listener.close()
        if request.get("kind") == "stage":
            conn.settimeout(None)
            return _supervise_stage(conn, request, fds)
        conn.close()
        _run_worker(request, fds)
    for fd in fds:
        os.close(fd)
    if request.get("kind") == "stage":
        return None  # its supervisor answers
    pidfd = os.pidfd_open(pid)
    try:
        with contextlib.suppress(OSError):  # the stage is gone: its worker sees the pipe
            socket.send_fds(conn, [PID.pack(pid)], [pidfd])  # closed and ends
    finally:
        os.close(pidfd)
    return None


if __name__ == "__main__":
    # Detach: the stage that started this waits only for the first process, which exits now.
    if os.fork() > 0:
        os._exit(0)
    stage_exit = _serve_requests(bytes.fromhex(sys.argv[1]).decode())
    if stage_exit is INTERRUPTED:  # as Python ends after an uncaught KeyboardInterrupt
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(stage_exit)  # None in the server; in a forked stage its exit code
