"""The warm worker server (stages/core/tracking/worker_server.py): real servers, real forks,
real MLflow runs. The module shares one server of its own (a variable of its own in its key);
the idle test starts another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TEST_EXPERIMENT

from stages.core.tracking import worker_server
from stages.core.tracking.store import HTTP_DEFAULTS, QUIET_DEFAULTS
from stages.core.tracking.worker_server import address

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server is Linux only")

STAGE = """\
import os, sys
from stages.core.tracking import runs
from stages.core.tracking.runs import start_worker, stage_run
start_worker()
kind = type(runs._started.process).__name__
with stage_run('split', {experiment!r}, {{'seed': 7}}, background=True) as run:
    run.log_metrics({{'rows': 42}})
    print(kind, run.id, flush=True)
    {then}
"""


def run_stage(env: dict, root: Path = REPO_ROOT, then: str = "pass") -> tuple[str, str]:
    """A tracked stage in a process of its own: which kind of worker it got and its run id."""
    script = STAGE.format(experiment=TEST_EXPERIMENT, then=then)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env | {"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if then == "pass":
        assert done.returncode == 0, done.stderr
    kind, run_id = done.stdout.split()
    return kind, run_id


def server_address(env: dict, root: Path = REPO_ROOT) -> str:
    """The address of the server of the stages run with ``env`` from ``root``."""
    # What a stage's environment holds once its tracking modules are imported.
    env = HTTP_DEFAULTS | QUIET_DEFAULTS | env | {"PYTHONPATH": str(root)}
    return address(env, str(root))


def wait_for_server(env: dict, root: Path = REPO_ROOT, timeout: float = 60) -> None:
    """Until the server for ``env`` answers (the first stage started it in the background)."""
    import socket

    name = server_address(env, root)
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(name)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("no worker server came up") from None
        time.sleep(0.2)


def new_server_env(mlflow_uri: str, idle_s: int) -> dict:
    """A stage's environment whose server is no other's (a variable of its own in the key)."""
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_uri, worker_server.IDLE: str(idle_s)}
    return env | {"WORKER_SERVER_TEST": uuid.uuid4().hex}


@pytest.fixture(scope="module")
def warm(mlflow_uri: str, mlflow_client) -> tuple[dict, str, str]:
    """The environment of this module's server, started by a first stage: the environment,
    the kind of worker that first stage got, and its run id."""
    env = new_server_env(mlflow_uri, idle_s=60)
    first_kind, first_id = run_stage(env)
    wait_for_server(env)
    return env, first_kind, first_id


def listening(env: dict) -> bool:
    """Whether the server for ``env`` listens, read from the kernel's socket table (a
    connection would count as a request, and keep it from idling out)."""
    return "@" + server_address(env)[1:] in Path("/proc/net/unix").read_text()


@pytest.fixture
def server_env(warm) -> dict:
    """The environment of a stage whose worker this module's server forks: started again if
    it idled out while other tests ran on this pytest worker."""
    env = warm[0]
    if not listening(env):
        run_stage(env)
        wait_for_server(env)
    return env


def test_stages_after_the_first_get_forked_workers_that_record_the_same(
    warm, mlflow_client
) -> None:
    server_env, first_kind, first_id = warm
    assert first_kind == "Popen"  # no server yet: it starts one for the next stages
    forked_kind, forked_id = run_stage(server_env)
    assert forked_kind == "ForkedProcess"
    first, forked = mlflow_client.get_run(first_id), mlflow_client.get_run(forked_id)
    assert forked.info.status == first.info.status == "FINISHED"
    assert forked.data.params == first.data.params == {"seed": "7"}
    assert forked.data.metrics == first.data.metrics == {"rows": 42.0}
    assert forked.info.run_name == first.info.run_name == "split"
    off_kind, _ = run_stage(server_env | {worker_server.ENABLED: "off"})
    assert off_kind == "Popen"


def test_a_forked_worker_takes_the_stages_environment(server_env, tmp_path) -> None:
    """Each worker logs where its own stage says, not where the server's first stage did."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'other.db'}"
    kind, run_id = run_stage(server_env | {"MLFLOW_TRACKING_URI": store})
    assert kind == "ForkedProcess"
    assert mlflow.MlflowClient(store).get_run(run_id).data.metrics == {"rows": 42.0}


def test_a_forked_worker_ends_the_run_killed_when_the_stage_dies(server_env, mlflow_client) -> None:
    kind, run_id = run_stage(server_env, then="os.kill(os.getpid(), 9)")
    assert kind == "ForkedProcess"
    deadline = time.monotonic() + 60
    while mlflow_client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mlflow_client.get_run(run_id).info.status == "KILLED"


def test_a_forked_worker_runs_the_checkouts_code_as_it_is_now(server_env, tmp_path) -> None:
    """One server serves every checkout, and an edit under stages/ is live at the next stage:
    a forked worker imports its code after the fork, from the stage's own checkout."""
    other = tmp_path / "checkout"
    shutil.copytree(
        REPO_ROOT / "stages", other / "stages", ignore=shutil.ignore_patterns("__pycache__")
    )
    worker = other / "stages/core/tracking/worker.py"
    text = worker.read_text()
    hook = "    requests = Connection(requests_fd, writable=False)\n"
    assert hook in text
    trace = '    Path("worker-was-here").write_text(__file__)\n'
    worker.write_text(text.replace(hook, hook + trace))
    kind, _ = run_stage(server_env, root=other)
    assert kind == "ForkedProcess"
    assert (other / "worker-was-here").read_text() == str(worker)


def test_the_key_ignores_what_differs_per_stage_and_nothing_else() -> None:
    env = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": "/repo"}
    base = address(env, "/repo")
    per_stage = env | {"MLFLOW_TRACKING_URI": "sqlite:///x.db", "DVC_EXP_NAME": "exp-1"}
    assert address(per_stage | {"PYTHONPATH": "/other"}, "/other") == base
    torchrun = {"RANK": "0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "a1b2"}
    assert address(env | torchrun | {"MAKELEVEL": "1"}, "/repo") == base
    assert address(env | {"PATH": "/usr/bin:/usr/bin"}, "/repo") == base  # the same lookups
    assert address(env | {"PATH": "/bin:/usr/bin"}, "/repo") != base
    assert address(env | {"OMP_NUM_THREADS": "2"}, "/repo") != base
    assert address(env | {"PYTHONPATH": "/repo:/lib"}, "/repo") != base
    assert address(env | {"MLFLOW_DISABLE_TELEMETRY": "false"}, "/repo") != base


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_only_the_servers_own_user_is_served(server_env) -> None:
    name = server_address(server_env)
    probe = (
        "import os, socket, sys\n"
        "os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10)\n"
        f"s.connect({name!r})\n"
        "r, w = os.pipe()\n"
        "try:\n"
        "    socket.send_fds(s, [(2).to_bytes(8, 'big')], [r, w, 2]); s.sendall(b'{}')\n"
        "    print(repr(s.recv(4)))\n"
        "except ConnectionError:\n"
        "    print(repr(b''))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Refused: a pid of 0, or the connection closed (reset, when it closes before reading the
    # request): never a worker's pid.
    assert done.stdout.strip() in (repr(bytes(4)), "b''")


def test_an_idle_server_exits(mlflow_uri) -> None:
    env = new_server_env(mlflow_uri, idle_s=3)
    run_stage(env)
    wait_for_server(env)
    up_since = time.monotonic()
    # Watched in the kernel's socket table: a connection would count as a request.
    while time.monotonic() - up_since < 30 and listening(env):
        time.sleep(0.2)
    assert 3 <= time.monotonic() - up_since < 30  # gone after its idle seconds, not before
    assert run_stage(env)[0] == "Popen"
