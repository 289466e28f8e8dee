"""A stage's side of the warm server (stages/core/common/warm_server.py): whether this stage
hands itself over, the key of the server it needs, asking it to fork the stage or its tracking
worker, starting one in the background when none listens, and the stand-in that the process
DVC started becomes for a forked stage.

The first stage that finds no server starts one and runs the plain way; the stages after it
run in forks. A server serves every stage run with the same interpreter, installed libraries,
environment (the variables a stage or an execution sets, such as DVC's and
``MLFLOW_TRACKING_URI``, aside) and process limits. ``PIPELINE_WARM_SERVER=off`` turns it off.

A stage (``python [-u] -m stages.<name>``: torchrun's ranks too) calls ``run_stage_warm()``
first thing, before it imports anything heavy. The process DVC started then stays as the
stage's stand-in: it passes on the signals it gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
SIGUSR1/2, SIGCONT, SIGWINCH; Ctrl-Z) to the stage's process group, and exits with the stage's
exit status, or dies of the signal that killed the stage. If the stand-in dies (SIGKILL of
DVC's process group), the supervisor kills the stage's group at once.

Stdlib only at import: every stage imports it first.
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

from stages.core.common.telemetry import MLFLOW_DEFAULTS, QUIET_ENV
from stages.core.common.warm_server import (
    ANSWER_TIMEOUT_S,
    FORWARDED,
    GO,
    HEADER,
    PID,
    STATUS,
    THREADS,
    peer_uid,
    receive_exactly,
    thread_count,
)

ENABLED = "PIPELINE_WARM_SERVER"
SERVER = Path(__file__).with_name("warm_server.py")
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
# and our Makefile's own: those set on make's command line reach its recipes, and it exports
# MkDocs' switch
PER_STAGE |= {"VENV", "PYTHON", "TORCH_INDEX", "NO_MKDOCS_2_WARNING"}  # (PYTEST_WORKERS: below)
# Our own switch, read when a stage starts tracking, not by any import.
PER_STAGE.add("PIPELINE_TRACKING")
# DVC's, its queue's (celery, multiprocessing's fork logging), pytest's and torchrun's
PER_STAGE_PREFIXES = ("DVC_", "CELERY_", "_MP_FORK_", "PYTEST_", "TORCHELASTIC_", "TORCH_NCCL_")
# MLflow's HTTP timeout and retries, which it reads for each request
PER_STAGE_PREFIXES += ("MLFLOW_HTTP_REQUEST_",)
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
# The environment this process started with (this module is imported with the `stages`
# package, before a stage sets anything): the key of its server, for the stage and for its
# tracking worker alike, whatever the stage has set by the time it starts the worker.
STARTUP_ENV: dict[str, str] = dict(os.environ)


class Unanswered(Exception):
    """The server took a stage's request and then failed to answer: it may have forked a
    worker on the stage's pipes, so the stage must not start another on them."""


def enabled(env: dict[str, str]) -> bool:
    """Whether stages use the server: on Linux with pidfds (kernel 5.3+), unless
    ``PIPELINE_WARM_SERVER`` is off."""
    switch = env.get(ENABLED, "on").lower()
    supported = sys.platform == "linux" and hasattr(os, "pidfd_open")
    return supported and switch not in ("off", "0", "false")


def _server_env(env: dict[str, str], package_root: str) -> dict[str, str]:
    """``env`` as the server runs with it: with the defaults every stage sets (telemetry off,
    MLflow's retries; the user's values kept), without the checkout on PYTHONPATH, and
    without a thread count that each fork takes from its stage (warm_server.THREADS)."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != package_root]
    dropped = {"PYTHONPATH"} | ({THREADS} if thread_count(env) is not None else set())
    server = QUIET_ENV | MLFLOW_DEFAULTS | {k: v for k, v in env.items() if k not in dropped}
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
    for code in (Path(__file__), SERVER):  # both sides of the protocol
        digest.update(code.read_bytes())
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
    if peer_uid(sock) != os.getuid():
        sock.close()
        return None
    return sock


def _send_request(sock: socket.socket, fds: list[int], request: dict) -> bool:
    """Send ``request`` with ``fds``; False when the server closed before reading it (it
    forked nothing)."""
    body = json.dumps(request).encode()
    try:
        socket.send_fds(sock, [HEADER.pack(len(body))], fds)
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
            answer, fds, _, _ = socket.recv_fds(sock, PID.size, 1)
        except OSError as exc:
            raise Unanswered(str(exc)) from None
    if answer == PID.pack(0) and not fds:  # it refused: it forked nothing
        return None
    if len(answer) != PID.size or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise Unanswered("no answer" if not answer else "a malformed answer")
    (pid,) = PID.unpack(answer)
    return ForkedProcess(pid, fds[0])


def stage_command(argv: list[str]) -> tuple[str, list[str], bool] | None:
    """The stage module, its arguments and whether ``-u`` was given, when ``argv``
    (``sys.orig_argv``) is exactly ``python [-u] -m stages.<module> [args]`` (torchrun starts its
    ranks with ``-u``); None for any other interpreter option, which a forked stage would not
    get. Only modules that call ``run_stage_warm`` are handed over: the stages, and the step
    `make pipeline` runs after them (stages.core.tracking.complete), not the plain tracking
    worker."""
    options = argv[1 : argv.index("-m")] if "-m" in argv[1:] else None
    if options not in ([], ["-u"]) or len(argv) < len(options) + 3:
        return None
    module = argv[len(options) + 2]
    package, _, name = module.partition(".")
    if package != "stages" or not all(part.isidentifier() for part in name.split(".")):
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
            answer = receive_exactly(sock, PID.size)
            if answer != PID.pack(0):
                sock.sendall(GO)  # the supervisor lets the stage start only on this byte
    except OSError:  # a timeout: the supervisor sees the connection close and kills the stage
        answer = b""
    if len(answer) != PID.size or answer == PID.pack(0):
        sock.close()  # refused, or no answer: the stage runs here
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in held:
            os.kill(os.getpid(), signum)
        return
    _stand_in(sock, PID.unpack(answer)[0], list(handlers), held)


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
        (code,) = STATUS.unpack(receive_exactly(sock, STATUS.size))
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


def _start_server(name: str, package_root: str) -> None:
    """Start a server in the background (it detaches itself at once); the caller goes on.
    It runs with this process's starting environment and the defaults every stage sets."""
    with open(os.devnull, "r+b") as devnull:
        starter = subprocess.Popen(
            [sys.executable, "-P", str(SERVER), name.encode().hex()],
            env=_server_env(STARTUP_ENV, package_root),
            stdin=devnull,
            stdout=devnull,
            stderr=devnull,
            start_new_session=True,
        )
    starter.wait()
