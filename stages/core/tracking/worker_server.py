"""A warm parent for tracking workers: one process imports mlflow, its SQL stores, torch and
pandas once, then forks the tracking worker of each stage, which so starts with them imported
instead of spending 3-6 s of CPU importing them (more than most stages spend on their work).

The first tracked stage that finds no server starts one in the background and starts its own
worker the plain way; the stages after it get forked workers. A server serves every stage run
with the same interpreter, installed libraries and environment (the variables a stage or an
execution sets, such as DVC's and ``MLFLOW_TRACKING_URI``, aside), and exits after
``PIPELINE_WORKER_SERVER_IDLE`` seconds (default 300) without a request.
``PIPELINE_WORKER_SERVER=off`` turns it off.

A forked worker runs the same code as a plain one (``stages.core.tracking.worker``), imported
after the fork from the stage's own checkout: an edit under stages/ never needs a restart,
and one server serves every checkout. So this file imports nothing of this package; the
server runs it as a script (``python -P worker_server.py``), and the key of a server includes
this file's bytes, so a stage only ever talks to a server of its own version.

Linux only (abstract unix sockets, pidfds); elsewhere every worker starts the plain way. Only
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

ENABLED = "PIPELINE_WORKER_SERVER"
IDLE = "PIPELINE_WORKER_SERVER_IDLE"
DEFAULT_IDLE_S = 300.0
# What the workers of the stages import: mlflow and its stores for every stage; torch, pandas
# and MLflow's pyfunc and evaluation for the stages that log, load and evaluate models.
PRELOAD = (
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.pyfunc",
    "mlflow.models.evaluation.default_evaluator",
    "torch",
    "pandas",
    "pyarrow.parquet",
)
# Variables that differ between the stages and executions one server serves. Libraries read
# them when used, not when imported, and the forked worker takes the stage's values. (The
# checkout on PYTHONPATH is left out of the key too: the worker's code is imported after the
# fork; the rest of PYTHONPATH is in it.)
PER_STAGE = {"MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"}
PER_STAGE |= {"MLFLOW_EXPERIMENT_ID", "PWD", "OLDPWD", "SHLVL", "_", ENABLED}
# torchrun's, set anew for every launch (rank 0 of a distributed stage starts the worker)
PER_STAGE |= {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"}
PER_STAGE |= {"MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME"}
PER_STAGE |= {"ROLE_WORLD_SIZE"}
# make's, when a stage runs under `make pipeline` (as against `dvc repro` in a shell)
PER_STAGE |= {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR"}
PER_STAGE_PREFIXES = ("DVC_", "PYTEST_", "TORCHELASTIC_")
# The pid of the stage a worker records for (stages.core.tracking.lineage.execution_key starts
# there): a forked worker's parent is the server, not the stage.
STAGE_PID = "PIPELINE_STAGE_PID"
PER_STAGE.add(STAGE_PID)
# How long a stage waits for the server to fork its worker (it answers in milliseconds).
ANSWER_TIMEOUT_S = 30.0
_HEADER = struct.Struct("!Q")
_PID = struct.Struct("!i")


class Unanswered(Exception):
    """The server took a stage's request and then failed to answer: it may have forked a
    worker on the stage's pipes, so the stage must not start another on them."""


def enabled(env: dict[str, str]) -> bool:
    """Whether stages use the server: on Linux with pidfds (kernel 5.3+), unless
    ``PIPELINE_WORKER_SERVER`` is off."""
    switch = env.get(ENABLED, "on").lower()
    supported = sys.platform == "linux" and hasattr(os, "pidfd_open")
    return supported and switch not in ("off", "0", "false")


def idle_seconds(env: dict[str, str]) -> float:
    """``PIPELINE_WORKER_SERVER_IDLE`` as a positive number of seconds, else the default."""
    try:
        seconds = float(env.get(IDLE) or DEFAULT_IDLE_S)
    except ValueError:
        return DEFAULT_IDLE_S
    return seconds if 0 < seconds < float("inf") else DEFAULT_IDLE_S


def _server_env(env: dict[str, str], package_root: str) -> dict[str, str]:
    """``env`` as the server runs with it: without the checkout on PYTHONPATH."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != package_root]
    server = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return server | ({"PYTHONPATH": os.pathsep.join(path)} if path else {})


def address(env: dict[str, str], package_root: str) -> str:
    """The abstract socket of the server for this interpreter, its libraries, this file and
    ``env`` (less what differs per stage): a change in any of them means another server."""
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
    for part in (sys.executable, sys.version, *stamps, json.dumps(kept)):
        digest.update(part.encode() + b"\0")
    digest.update(Path(__file__).read_bytes())
    return f"\0finetune-pipeline-tracking-{os.getuid()}-{digest.hexdigest()[:32]}"


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


def fork_worker(
    requests_fd: int, replies_fd: int, preload: tuple[str, ...], package_root: str, env: dict
) -> ForkedProcess | None:
    """A tracking worker forked by the server, holding the two pipe ends and the stage's
    stderr; None when there is no server (one is started in the background for the stages
    to come), it is off, or it refused without forking. Raises ``Unanswered`` when a server
    took the request but gave no answer."""
    if not enabled(env):
        return None
    name = address(env, package_root)
    body = json.dumps(
        {"env": env, "cwd": os.getcwd(), "root": package_root, "preload": list(preload)}
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_TIMEOUT_S)
        try:
            sock.connect(name)
        except OSError:  # none listens (a timeout here sent nothing either)
            _start_server(name, env, package_root)
            return None
        # Anyone can bind an abstract name that is free: send nothing to another user's.
        if _peer_uid(sock) != os.getuid():
            return None
        try:
            socket.send_fds(sock, [_HEADER.pack(len(body))], [requests_fd, replies_fd, 2])
            sock.sendall(body)
        except OSError:  # it closed the connection before reading: it forked nothing
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


def _peer_uid(sock: socket.socket) -> int:
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def _start_server(name: str, env: dict, package_root: str) -> None:
    """Start a server in the background (it detaches itself at once); the caller goes on."""
    with open(os.devnull, "r+b") as devnull:
        starter = subprocess.Popen(
            [sys.executable, "-P", __file__, name.encode().hex()],
            env=_server_env(env, package_root),
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
            raise ConnectionError("the worker server closed the connection")
        data += chunk
    return data


def _run_worker(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage's worker, then exit (never returns)."""
    try:
        requests_fd, replies_fd, stderr_fd = fds
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path.insert(0, request["root"])
        # Python's random reseeds itself in a forked child; numpy and torch do not.
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        from stages.core.tracking.worker import _serve

        _serve(requests_fd, replies_fd, request["preload"])
    except BaseException:
        import traceback

        traceback.print_exc()  # onto the stage's stderr
    finally:
        os._exit(1)  # _serve exits on its own; this is for a failure before it


def _serve_requests(name: str) -> None:
    """The server: claim the name, preload, listen, and fork one worker per request until
    idle. Stages that ask while it preloads find it not listening yet and start their workers
    the plain way (and a server that exits at once: the name is taken). A server that finds
    it cannot fork safely keeps the name, refusing every request, until idle: the stages then
    start plain workers without starting servers again."""
    import importlib
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(name)
    except OSError:  # another stage started the same server first
        return
    os.chdir("/")  # hold no stage's folder
    for module in PRELOAD:
        with contextlib.suppress(Exception):  # a worker that needs it fails the plain way
            importlib.import_module(module)
    # Forking a process with other threads is unsafe (a lock one of them holds stays held).
    refusing = threading.active_count() != 1
    listener.listen(16)
    listener.settimeout(idle_seconds(dict(os.environ)))
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return
        with conn:
            if refusing or _peer_uid(conn) != os.getuid():  # only this user's stages
                with contextlib.suppress(OSError):
                    conn.sendall(_PID.pack(0))  # refused: the stage starts a plain worker
            else:
                _answer(conn, listener)
        with contextlib.suppress(ChildProcessError):  # reap the workers that have exited
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def _answer(conn: socket.socket, listener: socket.socket) -> None:
    """Read one request from ``conn``, fork its worker and answer with its pid and a pidfd
    (opened before the worker can be reaped, so it names that worker and no later process)."""
    conn.settimeout(ANSWER_TIMEOUT_S)
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            raise ValueError("a malformed request")
        (size,) = _HEADER.unpack(header)
        request = json.loads(_receive_exactly(conn, size))
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        _run_worker(request, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        with contextlib.suppress(OSError):  # the stage is gone: its worker sees the pipe
            socket.send_fds(conn, [_PID.pack(pid)], [pidfd])  # closed and ends
    finally:
        os.close(pidfd)


if __name__ == "__main__":
    # Detach: the stage that started this waits only for the first process, which exits now.
    if os.fork() > 0:
        os._exit(0)
    _serve_requests(bytes.fromhex(sys.argv[1]).decode())
