"""A warm parent for stages and their tracking workers: one process imports torch, pandas,
scikit-learn, Great Expectations, transformers and mlflow once, then forks each later stage
and each stage's tracking worker, which so start with them imported instead of spending 1-6 s
of CPU importing them (more than most stages spend on their work).

The first stage that finds no server starts one in the background and runs the plain way; the
stages after it run in forks. A server serves every stage run with the same interpreter,
installed libraries, environment (the variables a stage or an execution sets, such as DVC's
and ``MLFLOW_TRACKING_URI``, aside) and process limits, and exits after
``PIPELINE_WARM_SERVER_IDLE`` seconds (default 300) without a request.
``PIPELINE_WARM_SERVER=off`` turns it off.

A stage (``python [-u] -m stages.<name>``: torchrun's ranks too) hands itself over first thing
(``run_stage_warm()``, before it imports anything heavy): the server forks a
supervisor, which forks the stage in a process group of its own, with the stage's stdin,
stdout and stderr, environment, working folder, umask, ``sys.path`` and arguments. The
process DVC started stays as the stage's stand-in: it passes on the signals it gets (SIGINT,
SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2) to the stage's process group, and exits with the stage's
exit status, or dies of the signal that killed the stage. If the stand-in dies (SIGKILL of
DVC's process group), the supervisor kills the stage's group at once.

A forked stage or worker runs the same code as a plain one, imported after the fork from the
stage's own checkout: an edit under stages/ never needs a restart, and one server serves
every checkout. So the server imports nothing of this package (only a stage's side of this
file does, when it starts a server or computes a key); it runs this file as a script
(``python -P warm_server.py``), and the key of a server includes this file's bytes, so a stage
only ever talks to a server of its own version.

Linux only (abstract unix sockets, pidfds); elsewhere everything starts the plain way. Only
processes of the server's own user are served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

ENABLED = "PIPELINE_WARM_SERVER"
IDLE = "PIPELINE_WARM_SERVER_IDLE"
DEFAULT_IDLE_S = 300.0
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
# Variables that differ between the stages and executions one server serves. Libraries read
# them when used, not when imported, and the forked process takes the stage's values. (The
# checkout on PYTHONPATH is left out of the key too: the code of this package is imported
# after the fork; the rest of PYTHONPATH is in it.)
PER_STAGE = {"MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"}
PER_STAGE |= {"MLFLOW_EXPERIMENT_ID", "PWD", "OLDPWD", "SHLVL", "_", ENABLED}
# torchrun's, set anew for every launch (rank 0 of a distributed stage starts the worker)
PER_STAGE |= {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"}
PER_STAGE |= {"MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME"}
PER_STAGE |= {"ROLE_WORLD_SIZE"}
# make's, when a stage runs under `make pipeline` (as against `dvc repro` in a shell)
PER_STAGE |= {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR"}
# Our own switch, read when a stage starts tracking, not by any import.
PER_STAGE.add("PIPELINE_TRACKING")
# DVC's, its queue's (celery, multiprocessing's fork logging), pytest's and torchrun's
PER_STAGE_PREFIXES = ("DVC_", "CELERY_", "_MP_FORK_", "PYTEST_", "TORCHELASTIC_", "TORCH_NCCL_")
# Set by libraries in their own process when imported (torch's inductor, transformers, the
# OpenMP runtime's guards): a fresh process sets them the same way, so they say nothing about
# the server a stage needs (a test process that imported them passes them on to its stages).
PER_STAGE |= {"TORCHINDUCTOR_CACHE_DIR", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "WANDB_DISABLED"}
PER_STAGE |= {"KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}
PER_STAGE_PREFIXES += ("_TORCHINDUCTOR_",)
# The pid of the process DVC started for a stage: stages.core.tracking.lineage.execution_key
# starts there. A forked worker's parent is the server, and a forked stage's the supervisor.
STAGE_PID = "PIPELINE_STAGE_PID"
PER_STAGE.add(STAGE_PID)
# How long a stage waits for the server to fork its worker or itself (it answers in ms).
ANSWER_TIMEOUT_S = 30.0
# The signals a stage's stand-in passes on to the stage's process group, unless it ignores
# them (as under nohup), in which case the stage ignores them too. Ctrl-Z (SIGTSTP) stops
# the stage, then the stand-in; SIGCONT (`fg`) goes on to the stage.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")
FORWARDED += ("SIGWINCH", "SIGTSTP")
_GO = b"\0"  # the stand-in's go-ahead: no signal is 0
# The environment this process started with (this module is imported with the `stages`
# package, before a stage sets anything): the key of its server, for the stage and for its
# tracking worker alike, whatever the stage has set by the time it starts the worker.
STARTUP_ENV: dict[str, str] = dict(os.environ)
_HEADER = struct.Struct("!Q")
_PID = struct.Struct("!i")
_STATUS = struct.Struct("!i")


class Unanswered(Exception):
    """The server took a stage's request and then failed to answer: it may have forked a
    worker on the stage's pipes, so the stage must not start another on them."""


def enabled(env: dict[str, str]) -> bool:
    """Whether stages use the server: on Linux with pidfds (kernel 5.3+), unless
    ``PIPELINE_WARM_SERVER`` is off."""
    switch = env.get(ENABLED, "on").lower()
    supported = sys.platform == "linux" and hasattr(os, "pidfd_open")
    return supported and switch not in ("off", "0", "false")


def idle_seconds(env: dict[str, str]) -> float:
    """``PIPELINE_WARM_SERVER_IDLE`` as a positive number of seconds, else the default."""
    try:
        seconds = float(env.get(IDLE) or DEFAULT_IDLE_S)
    except ValueError:
        return DEFAULT_IDLE_S
    return seconds if 0 < seconds < float("inf") else DEFAULT_IDLE_S


def _server_env(env: dict[str, str], package_root: str) -> dict[str, str]:
    """``env`` as the server runs with it: with the defaults every stage sets (telemetry off,
    MLflow's retries; the user's values kept), without the checkout on PYTHONPATH."""
    from stages.core.common.telemetry import MLFLOW_DEFAULTS, QUIET_ENV

    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != package_root]
    server = QUIET_ENV | MLFLOW_DEFAULTS | {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return server | ({"PYTHONPATH": os.pathsep.join(path)} if path else {})


def _process_limits() -> list[str]:
    """What a forked process inherits from the server rather than from its stage: priority,
    CPUs, resource limits and control group (so `nice`, `taskset`, `ulimit` or another cgroup
    mean another server)."""
    import resource

    limits = [
        f"{name}={resource.getrlimit(getattr(resource, name))}"
        for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_"))
    ]
    with contextlib.suppress(OSError):
        limits.append(Path("/proc/self/cgroup").read_text())
    return [
        f"nice={os.getpriority(os.PRIO_PROCESS, 0)}",
        f"cpus={sorted(os.sched_getaffinity(0))}",
    ] + limits


def address(env: dict[str, str], package_root: str) -> str:
    """The abstract socket of the server for this interpreter, its libraries, this file,
    ``env`` (less what differs per stage) and this process's limits: a change in any of them
    means another server."""
    digest = hashlib.sha256()
    site_dirs = sorted({p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)})
    # Installing, upgrading or removing a library changes its site-packages folder.
    stamps = [f"{p}:{os.stat(p).st_mtime_ns}" for p in site_dirs]
    server_env = _server_env(env, package_root)
    # A folder repeated on PATH finds nothing new (make and shells prepend theirs again).
    path = dict.fromkeys(server_env.get("PATH", "").split(os.pathsep))
    server_env["PATH"] = os.pathsep.join(path)
    kept = sorted(
        (k, v)
        for k, v in server_env.items()
        if k not in PER_STAGE and not k.startswith(PER_STAGE_PREFIXES)
    )
    parts = (sys.executable, sys.version, *stamps, json.dumps(kept), *_process_limits())
    for part in parts:
        digest.update(part.encode() + b"\0")
    digest.update(Path(__file__).read_bytes())
    return f"\0finetune-pipeline-warm-{os.getuid()}-{digest.hexdigest()[:32]}"


class ForkedProcess:
    """A worker the server forked, as the stage sees it, through the pidfd the server opened
    on it before it could exit: not the stage's child, so its exit code is not the stage's to
    collect."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the worker has exited (``subprocess.TimeoutExpired`` after ``timeout``)."""
        if not select.select([self._pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(f"tracking worker {self.pid}", timeout or 0)

    def kill(self) -> None:
        with contextlib.suppress(OSError):  # it has exited
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._pidfd)


def _connect(name: str, package_root: str) -> socket.socket | None:
    """A connection to the server ``name`` of this user; None when none listens (one is
    started in the background for the stages to come) or another user's holds the name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ANSWER_TIMEOUT_S)
    try:
        sock.connect(name)
    except OSError:  # none listens (a timeout here sent nothing either)
        sock.close()
        _start_server(name, package_root)
        return None
    # Anyone can bind an abstract name that is free: send nothing to another user's.
    if _peer_uid(sock) != os.getuid():
        sock.close()
        return None
    return sock


def _send_request(sock: socket.socket, fds: list[int], request: dict) -> bool:
    """Send ``request`` with ``fds``; False when the server closed before reading it (it
    forked nothing)."""
    body = json.dumps(request).encode()
    try:
        socket.send_fds(sock, [_HEADER.pack(len(body))], fds)
        sock.sendall(body)
    except OSError:
        return False
    return True


def fork_worker(
    entry: str,
    requests_fd: int,
    replies_fd: int,
    preload: tuple[str, ...],
    package_root: str,
    env: dict,
) -> ForkedProcess | None:
    """A tracking worker forked by the server, holding the two pipe ends and the stage's
    stderr, that runs ``entry`` (``module:function``, imported from the stage's checkout after
    the fork) with the two pipe ends and ``preload``; None when there is no server (one is
    started in the background for the stages to come), it is off, or it refused without
    forking. Raises ``Unanswered`` when a server took the request but gave no answer."""
    if not enabled(env):
        return None
    request = {
        "kind": "worker",
        "entry": entry,
        "env": env,
        "cwd": os.getcwd(),
        "root": package_root,
        "preload": list(preload),
    }
    sock = _connect(address(STARTUP_ENV, package_root), package_root)
    if sock is None:
        return None
    with sock:
        if not _send_request(sock, [requests_fd, replies_fd, 2], request):
            return None
        try:
            answer, fds, _, _ = socket.recv_fds(sock, _PID.size, 1)
        except OSError as exc:
            raise Unanswered(str(exc)) from None
    if answer == _PID.pack(0) and not fds:  # it refused: it forked nothing
        return None
    if len(answer) != _PID.size or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise Unanswered("no answer" if not answer else "a malformed answer")
    (pid,) = _PID.unpack(answer)
    return ForkedProcess(pid, fds[0])


def stage_command(argv: list[str]) -> tuple[str, list[str], bool] | None:
    """The stage module, its arguments and whether ``-u`` was given, when ``argv``
    (``sys.orig_argv``) is exactly ``python [-u] -m stages.<name> [args]`` (torchrun starts its
    ranks with ``-u``); None for any other interpreter option, which a forked stage would not
    get, and for a module below a stage (the plain tracking worker)."""
    options = argv[1 : argv.index("-m")] if "-m" in argv[1:] else None
    if options not in ([], ["-u"]) or len(argv) < len(options) + 3:
        return None
    module = argv[len(options) + 2]
    package, _, name = module.partition(".")
    if package != "stages" or not name.isidentifier() or name == "core":
        return None
    return module, argv[len(options) + 3 :], options == ["-u"]


def run_stage_warm() -> None:
    """Hand this stage over to the server when one for it listens: never returns then (this
    process exits as the stage did). Returns at once to run the stage here when it is not
    ``python [-u] -m stages.<name>`` (or it is already the forked stage), the server is off
    or absent (one is started for the stages to come), or refuses.
    A stage module calls it first, before it imports anything heavy."""
    package_root = str(Path(__file__).resolve().parents[3])
    command = stage_command(sys.orig_argv)
    env = dict(os.environ)
    if command is None or not enabled(env):
        return
    module, args, unbuffered = command
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:  # a standard stream closed: nothing to hand over
        return
    umask = os.umask(0o22)
    os.umask(umask)
    forwarded = [getattr(signal, name) for name in FORWARDED]
    ignored = [signum for signum in forwarded if signal.getsignal(signum) == signal.SIG_IGN]
    request = {
        "kind": "stage",
        "env": env | {STAGE_PID: str(os.getpid())},
        "cwd": os.getcwd(),
        "path": sys.path,
        "module": module,
        "args": args,
        "unbuffered": unbuffered,
        "umask": umask,
        "ignored": ignored,
    }
    sock = _connect(address(STARTUP_ENV, package_root), package_root)
    if sock is None:
        return
    # From here on a signal is held until the stage runs, then passed on to it; or, if it
    # runs here after all, raised again here.
    held: list[int] = []
    handlers = {signum: signal.getsignal(signum) for signum in forwarded if signum not in ignored}
    for signum in handlers:
        signal.signal(signum, lambda number, _frame: held.append(number))
    answer = b""
    try:
        if _send_request(sock, [0, 1, 2], request):
            answer = _receive_exactly(sock, _PID.size)
            if answer != _PID.pack(0):
                sock.sendall(_GO)  # the supervisor lets the stage start only on this byte
    except OSError:  # a timeout: the supervisor sees the connection close and kills the stage
        answer = b""
    if len(answer) != _PID.size or answer == _PID.pack(0):
        sock.close()  # refused, or no answer: the stage runs here
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in held:
            os.kill(os.getpid(), signum)
        return
    _stand_in(sock, _PID.unpack(answer)[0], list(handlers), held)


def _stand_in(sock: socket.socket, pid: int, forwarded: list[int], held: list[int]) -> None:
    """Pass the signals this process gets (``held`` ones first) on to the forked stage
    ``pid`` until its supervisor reports its exit status, then exit with it (never
    returns)."""

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(OSError):
            if signum == signal.SIGTSTP:  # stop the stage, then this process
                sock.sendall(bytes([signal.SIGSTOP]))
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                sock.sendall(bytes([signum]))

    for signum in forwarded:
        signal.signal(signum, forward)
    for signum in held:
        forward(signum, None)
    sock.settimeout(None)
    try:
        (code,) = _STATUS.unpack(_receive_exactly(sock, _STATUS.size))
    except (OSError, struct.error):
        print(f"warm server: stage {pid} ended without an exit status", file=sys.stderr)
        os._exit(1)  # (its supervisor, dying, closed the connection after killing it)
    if code < 0:  # killed by a signal: die of the same one, without a core of this process
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(OSError, ValueError):  # (SIGKILL's cannot be set)
            signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _peer_uid(sock: socket.socket) -> int:
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def _start_server(name: str, package_root: str) -> None:
    """Start a server in the background (it detaches itself at once); the caller goes on.
    It runs with this process's starting environment and the defaults every stage sets."""
    with open(os.devnull, "r+b") as devnull:
        starter = subprocess.Popen(
            [sys.executable, "-P", __file__, name.encode().hex()],
            env=_server_env(STARTUP_ENV, package_root),
            stdin=devnull,
            stdout=devnull,
            stderr=devnull,
            start_new_session=True,
        )
    starter.wait()


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
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
        if os.read(go_read, 1) != _GO:  # the stand-in gave up: never run
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
        conn.sendall(_PID.pack(pid))
        watched, started = [conn, pidfd], False
        while True:
            ready = select.select(watched, [], [])[0]
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                os._exit(0)
            signals = conn.recv(64)
            if not signals:  # the stand-in died (DVC's process group killed): so does the stage
                watched.remove(conn)
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            if not started and signals[:1] == _GO:
                started, signals = True, signals[1:]
                os.write(go_write, _GO)
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
    import importlib
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(name)
    except OSError:  # another stage started the same server first
        return None
    os.chdir("/")  # hold no stage's folder
    for module in PRELOAD:
        with contextlib.suppress(Exception):  # a stage that needs it fails the plain way
            importlib.import_module(module)
    # Forking a process with other threads is unsafe (a lock one of them holds stays held),
    # and a CUDA context does not survive a fork (no import should make one; if one did, a
    # stage on the GPU would fail).
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_initialized()
    refusing = threading.active_count() != 1 or cuda
    listener.listen(16)
    listener.settimeout(idle_seconds(dict(os.environ)))
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return None
        with conn:
            if refusing or _peer_uid(conn) != os.getuid():  # only this user's stages
                with contextlib.suppress(OSError):
                    conn.sendall(_PID.pack(0))  # refused: the stage starts the plain way
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
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            raise ValueError("a malformed request")
        (size,) = _HEADER.unpack(header)
        request = json.loads(_receive_exactly(conn, size))
        if not isinstance(request, dict) or request.get("kind") not in ("stage", "worker"):
            raise ValueError("a malformed request")
        pid = os.fork()
    except (OSError, ValueError):  # (a fork that failed: the stage runs the plain way)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(_PID.pack(0))
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
            socket.send_fds(conn, [_PID.pack(pid)], [pidfd])  # closed and ends
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
