"""A local team stack without Docker: PostgreSQL (Debian's packages, run as the unprivileged
``postgres`` user) as MLflow's backend store, and an ``mlflow server`` on 127.0.0.1 in front of it
with proxied artifacts. What ``make team-up`` / ``make team-down`` run:

    python scripts/team.py up        # start (or find running) PostgreSQL and the MLflow server
    python scripts/team.py status    # what runs where; exit 0 when both answer
    python scripts/team.py down      # stop both; the data and ports stay for the next `up`
    python scripts/team.py check     # can this machine run PostgreSQL? (one line; exit 0 if so)

Everything lives in one folder (``--dir``, else ``TEAM_DIR``, else ``.team/`` at the repo root,
ignored by git and DVC): ``pgdata/``, ``artifacts/``, ``logs/{postgres,mlflow}.log`` and ``env``,
a shell file (``source .team/env``) exporting ``MLFLOW_TRACKING_URI`` and the two ports. Both
servers listen on 127.0.0.1 only, on free ports (or ``TEAM_DB_PORT`` / ``TEAM_MLFLOW_PORT``).

Credentials come from the environment: ``TEAM_DB_USER`` and ``TEAM_DB_NAME`` (default
``mlflow``) and ``TEAM_DB_PASSWORD``; without it, a random password is made on the first ``up``
and kept in ``<dir>/secrets/db_password`` (mode 0600). No password is written anywhere else:
not in ``env``, not on a command line (the MLflow server gets it as ``PGPASSWORD``), not in a
log. docker-compose.yml runs the same server with the same variables and flags.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"TEAM_DB_USER": "mlflow", "TEAM_DB_NAME": "mlflow", "TEAM_MLFLOW_WORKERS": "2"}
INSTALL_HINT = "apt-get install -y postgresql"
# MLflow's server also starts a GenAI job runner (eight huey processes); this stack has no use
# for it, and on a small machine it costs memory and start-up time.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}
START_TIMEOUT = 180  # seconds for the MLflow server's first start (it creates the schema)
PG_USER = "postgres"  # the OS user PostgreSQL runs as when this script runs as root
DEBIAN_BINARIES = Path("/usr/lib/postgresql")  # <version>/bin/ of Debian's postgresql packages


class TeamError(Exception):
    """Something the user can fix; printed as one line."""


@dataclass(frozen=True)
class Stack:
    """Where a stack lives and how it is reached."""

    root: Path
    db_user: str
    db_name: str
    workers: str

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def pid_file(self) -> Path:
        return self.root / "mlflow.pid"

    @property
    def password_file(self) -> Path:
        return self.root / "secrets" / "db_password"


def stack_from_env(directory: str | None) -> Stack:
    env = {key: os.environ.get(key) or value for key, value in DEFAULTS.items()}
    root = Path(directory or os.environ.get("TEAM_DIR") or REPO_ROOT / ".team").resolve()
    return Stack(root, env["TEAM_DB_USER"], env["TEAM_DB_NAME"], env["TEAM_MLFLOW_WORKERS"])


def backend_store_uri(user: str, host: str, port: int | str, database: str) -> str:
    """The SQLAlchemy URI of the database, without a password (libpq reads ``PGPASSWORD``)."""
    return f"postgresql+psycopg2://{user}@{host}:{port}/{database}"


def mlflow_server_args(
    host: str, port: int | str, backend_uri: str, artifacts: str, workers: str
) -> list[str]:
    """The flags of ``mlflow server``: the same here and in docker-compose.yml."""
    return [
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts,
        "--workers", str(workers),
    ]  # fmt: skip


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The folder holding initdb, pg_ctl and postgres: ``TEAM_PG_BIN``, else the one of
    ``initdb`` on PATH, else the newest ``/usr/lib/postgresql/<version>/bin``."""
    candidates = []
    if os.environ.get("TEAM_PG_BIN"):
        candidates.append(Path(os.environ["TEAM_PG_BIN"]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    versions = DEBIAN_BINARIES.glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))[::-1]
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise TeamError(f"PostgreSQL not found (no initdb, pg_ctl and postgres); {INSTALL_HINT}")


def postgres_account() -> pwd.struct_passwd:
    """The OS user PostgreSQL runs as: ``postgres`` (created if missing) when this script runs
    as root, which PostgreSQL refuses to run as; else the current user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        create = ["useradd", "--system", "--user-group", "--no-create-home"]
        subprocess.run([*create, "--shell", "/usr/sbin/nologin", PG_USER], check=True)
        return pwd.getpwnam(PG_USER)


def as_account(account: pwd.struct_passwd) -> dict:
    """subprocess arguments that run a PostgreSQL tool as ``account``, with a minimal
    environment (none of the caller's variables, secrets among them, reach the server)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LC_ALL": "C.UTF-8",
    }
    if account.pw_uid == os.geteuid():
        return {"env": env}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": env}


def give_to(account: pwd.struct_passwd, *paths: Path) -> None:
    for path in paths:
        if account.pw_uid != os.geteuid():
            os.chown(path, account.pw_uid, account.pw_gid)


def check_postgres() -> str:
    """One line: the PostgreSQL this machine would run and as whom, or why it cannot
    (TeamError)."""
    folder = postgres_bin()
    version = subprocess.run(
        [str(folder / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        import psycopg2  # noqa: F401  (MLflow's server needs it for postgresql+psycopg2://)
    except ImportError:
        raise TeamError("psycopg2 is not installed (pip install psycopg2-binary)") from None
    if os.geteuid() != 0:
        user = pwd.getpwuid(os.geteuid()).pw_name
    else:
        try:
            user = pwd.getpwnam(PG_USER).pw_name
        except KeyError:
            user = f"{PG_USER} (created by the first `up`)"
    return f"{version} in {folder}, run as user {user}"


def db_password(stack: Stack, account: pwd.struct_passwd) -> str:
    """``TEAM_DB_PASSWORD``, else the stack's own random one (made on first use, mode 0600)."""
    if os.environ.get("TEAM_DB_PASSWORD"):
        return os.environ["TEAM_DB_PASSWORD"]
    if stack.password_file.is_file():
        return stack.password_file.read_text().strip()
    stack.password_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    fd = os.open(stack.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def init_cluster(stack: Stack, folder: Path, account, password: str) -> None:
    """initdb: the database user named TEAM_DB_USER with the password, scram-sha-256 over TCP
    on 127.0.0.1 only, no Unix socket."""
    stack.pgdata.mkdir(mode=0o700)
    give_to(account, stack.pgdata)
    # initdb reads the password from a file: one that only the PostgreSQL user can read,
    # removed at once.
    secret_dir = Path(_private_dir(stack.root, account))
    pwfile = secret_dir / "pw"
    try:
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password)
        give_to(account, pwfile)
        command = [
            str(folder / "initdb"), "-D", str(stack.pgdata), "-U", stack.db_user,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
        ]  # fmt: skip
        log = stack.logs / "initdb.log"
        with log.open("w") as out:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=stack.root, **as_account(account)
            )
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)
    if done.returncode != 0:
        shutil.rmtree(stack.pgdata, ignore_errors=True)
        raise TeamError(f"initdb failed (exit {done.returncode}); see {log}")
    with (stack.pgdata / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# scripts/team.py: TCP on the loopback address only, no Unix socket\n"
            f"listen_addresses = '{HOST}'\nunix_socket_directories = ''\n"
        )


def _private_dir(parent: Path, account) -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix=".initdb-", dir=parent)
    give_to(account, Path(path))
    return path


def postgres_port(stack: Stack) -> int | None:
    """The port of the running PostgreSQL of this stack, None when it is not running."""
    pid_file = stack.pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return port if _answers(port) else None


def start_postgres(stack: Stack, folder: Path, account, port: int) -> None:
    log = stack.logs / "postgres.log"
    log.touch()
    give_to(account, log)
    command = [
        str(folder / "pg_ctl"), "-D", str(stack.pgdata), "-l", str(log), "-w", "-t", "60",
        "-o", f"-p {port}", "start",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=stack.root, **as_account(account)
    )
    if done.returncode != 0:
        raise TeamError(f"PostgreSQL did not start on {HOST}:{port}; see {log}")


def stop_postgres(stack: Stack, folder: Path, account) -> bool:
    if not (stack.pgdata / "postmaster.pid").is_file():
        return False
    command = [str(folder / "pg_ctl"), "-D", str(stack.pgdata), "-m", "fast", "-w", "stop"]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=stack.root, **as_account(account)
    )
    return done.returncode == 0


def ensure_database(stack: Stack, port: int, password: str) -> None:
    """Create the database TEAM_DB_NAME if missing (as TEAM_DB_USER)."""
    import psycopg2
    from psycopg2 import sql

    try:
        connection = psycopg2.connect(
            host=HOST, port=port, user=stack.db_user, password=password, dbname="postgres"
        )
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "password authentication failed" in str(exc):
            reason = (
                f"password authentication failed for user {stack.db_user!r}: {stack.pgdata} was "
                "made with another TEAM_DB_USER or TEAM_DB_PASSWORD; use those, or run "
                f"`down` and remove {stack.root} to start afresh"
            )
        raise TeamError(f"PostgreSQL on {HOST}:{port}: {reason}") from None
    connection.autocommit = True
    with contextlib.closing(connection), connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (stack.db_name,))
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(stack.db_name)))


# --- the MLflow server ----------------------------------------------------------------------


def mlflow_pid(stack: Stack) -> int | None:
    """The pid of this stack's running MLflow server (None if gone, or if the pid is now
    another program's)."""
    try:
        pid = int(stack.pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    is_server = b"server" in cmdline and any(part.endswith(b"mlflow") for part in cmdline)
    return pid if is_server and str(stack.root).encode() in b" ".join(cmdline) else None


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow(stack: Stack, db_port: int, port: int, password: str) -> int:
    """Start ``mlflow server`` in its own session (logs appended to logs/mlflow.log), wait until
    /health answers; returns its pid."""
    executable = Path(sys.executable).parent / "mlflow"
    if not executable.is_file():
        executable = Path(shutil.which("mlflow") or "mlflow")
    stack.artifacts.mkdir(exist_ok=True)
    uri = backend_store_uri(stack.db_user, HOST, db_port, stack.db_name)
    args = mlflow_server_args(HOST, port, uri, str(stack.artifacts), stack.workers)
    env = os.environ | SERVER_ENV | {"PGPASSWORD": password}
    log = stack.logs / "mlflow.log"
    with log.open("a") as out:
        out.write(f"--- scripts/team.py up: mlflow server on {HOST}:{port}\n")
        out.flush()
        process = subprocess.Popen(
            [str(executable), "server", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=stack.root,
            start_new_session=True,  # down stops its whole process group
        )
    stack.pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TeamError(f"the MLflow server exited with code {process.returncode}; see {log}")
        if health(port):
            return process.pid
        time.sleep(0.5)
    stop_process_group(process.pid)
    raise TeamError(f"the MLflow server did not answer on {HOST}:{port} in {START_TIMEOUT} s")


def stop_process_group(pid: int, grace: float = 20) -> None:
    """SIGTERM to the server's process group (server, uvicorn and its workers), then SIGKILL
    to whatever is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child when `up` gives up on it
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


# --- the env file and ports -----------------------------------------------------------------


def read_env(stack: Stack) -> dict[str, str]:
    """The variables the stack's env file exports."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for line in stack.env_file.read_text().splitlines():
            match = re.fullmatch(r"export (\w+)=(\S*)", line.strip())
            if match:
                found[match[1]] = match[2]
    return found


def write_env(stack: Stack, db_port: int, mlflow_port: int) -> None:
    text = (
        "# Written by scripts/team.py up. `source .team/env`, then `dvc repro` logs to the team\n"
        "# server. (No password here: the server holds it.)\n"
        f"export MLFLOW_TRACKING_URI=http://{HOST}:{mlflow_port}\n"
        f"export TEAM_MLFLOW_PORT={mlflow_port}\n"
        f"export TEAM_DB_PORT={db_port}\n"
    )
    partial = stack.env_file.with_suffix(".tmp")
    partial.write_text(text)
    os.replace(partial, stack.env_file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def pick_port(wanted: str | None, previous: str | None) -> int:
    """``wanted`` (TEAM_*_PORT) if set; else the port of the last ``up`` if still free (so that
    a restarted stack keeps its URI); else a free one."""
    if wanted:
        return int(wanted)
    if previous and not _answers(int(previous)):
        return int(previous)
    return free_port()


@contextlib.contextmanager
def locked(stack: Stack) -> Iterator[None]:
    from filelock import FileLock

    with FileLock(stack.root / ".lock"):
        yield


# --- commands -------------------------------------------------------------------------------


def up(stack: Stack) -> str:
    folder = postgres_bin()
    account = postgres_account()
    for path in (stack.root, stack.logs):
        path.mkdir(parents=True, exist_ok=True)
    _check_reachable(stack.root, account)
    with locked(stack):
        password = db_password(stack, account)
        previous = read_env(stack)
        if not (stack.pgdata / "PG_VERSION").is_file():
            init_cluster(stack, folder, account, password)
        db_port = postgres_port(stack)
        db_started = db_port is None
        if db_started:
            db_port = pick_port(os.environ.get("TEAM_DB_PORT"), previous.get("TEAM_DB_PORT"))
            start_postgres(stack, folder, account, db_port)
        try:
            ensure_database(stack, db_port, password)
            pid, port = mlflow_pid(stack), _int(previous.get("TEAM_MLFLOW_PORT"))
            # A server from before PostgreSQL (re)started may hold its old port: restart it.
            if pid is None or port is None or db_started or not health(port):
                if pid is not None:
                    stop_process_group(pid)
                wanted = os.environ.get("TEAM_MLFLOW_PORT")
                port = pick_port(wanted, previous.get("TEAM_MLFLOW_PORT"))
                start_mlflow(stack, db_port, port, password)
        except TeamError:
            if db_started:  # leave nothing half up
                stop_postgres(stack, folder, account)
            raise
        write_env(stack, db_port, port)
    return (
        f"team: up: MLflow at http://{HOST}:{port} (PostgreSQL on {HOST}:{db_port}, database "
        f"{stack.db_name}; logs in {stack.logs}); `source {_shown(stack.env_file)}` to use it"
    )


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _check_reachable(root: Path, account) -> None:
    """PostgreSQL's user must be able to enter the stack's folder (a private parent folder,
    such as a home directory of mode 0700, would stop it with a less clear message)."""
    if account.pw_uid == os.geteuid():
        return
    done = subprocess.run(["test", "-x", str(root)], **as_account(account))
    if done.returncode != 0:
        raise TeamError(
            f"user {account.pw_name} cannot enter {root} (a parent folder is private); "
            "choose another folder with TEAM_DIR or --dir"
        )


def down(stack: Stack) -> str:
    stopped = []
    if not stack.root.is_dir():
        return "team: down (nothing was started here)"
    with locked(stack):
        pid = mlflow_pid(stack)
        if pid is not None:
            stop_process_group(pid)
            stopped.append("the MLflow server")
        stack.pid_file.unlink(missing_ok=True)
        if (stack.pgdata / "PG_VERSION").is_file() and stop_postgres(
            stack, postgres_bin(), postgres_account()
        ):
            stopped.append("PostgreSQL")
    # The env file stays: the next `up` takes the same ports when they are free, so that
    # MLFLOW_TRACKING_URI in a teammate's shell stays right.
    what = f"stopped {' and '.join(stopped)}" if stopped else "nothing was running"
    return f"team: down: {what}; data kept in {stack.pgdata} and {stack.artifacts}"


def status(stack: Stack) -> tuple[str, bool]:
    env = read_env(stack)
    db_port = postgres_port(stack) if stack.pgdata.is_dir() else None
    port = _int(env.get("TEAM_MLFLOW_PORT"))
    serving = mlflow_pid(stack) is not None and port is not None and health(port)
    lines = [
        f"PostgreSQL: {f'running on {HOST}:{db_port}' if db_port else 'stopped'}",
        f"MLflow server: {f'running at http://{HOST}:{port}' if serving else 'stopped'}",
        f"folder: {stack.root}",
    ]
    return "\n".join(lines), bool(db_port and serving)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "check"])
    parser.add_argument("--dir", help="the stack's folder (default: TEAM_DIR, else .team/)")
    args = parser.parse_args(argv)
    stack = stack_from_env(args.dir)
    try:
        if args.command == "check":
            print(f"team: {check_postgres()}")
        elif args.command == "up":
            print(up(stack))
        elif args.command == "down":
            print(down(stack))
        else:
            text, running = status(stack)
            print(text)
            return 0 if running else 3
    except TeamError as exc:
        print(f"team: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
