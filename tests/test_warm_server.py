"""The warm server (stages/core/common/warm_server.py) and a stage's side of it (warm_start.py):
real servers, real forks of tracking workers and of stages, real MLflow runs. The module shares
one server of its own (a variable of its own in its key); the idle test starts another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TEST_EXPERIMENT, new_store

from stages.core.common import warm_server, warm_start
from stages.core.common.warm_start import address

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
    # The environment the stage started with (its tracking worker uses the same key).
    return address(env | {"PYTHONPATH": str(root)}, str(root))


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
                    raise AssertionError("no warm server came up") from None
        time.sleep(0.2)


def new_server_env(mlflow_uri: str, idle_s: int) -> dict:
    """A stage's environment whose server is no other's (a variable of its own in the key)."""
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_uri, warm_server.IDLE: str(idle_s)}
    return env | {"WARM_SERVER_TEST": uuid.uuid4().hex}


@pytest.fixture(scope="module")
def warm(mlflow_uri: str, mlflow_client) -> tuple[dict, str, str]:
    """The environment of this module's server, started by a first stage: the environment,
    the kind of worker that first stage got, and its run id."""
    env = new_server_env(mlflow_uri, idle_s=600)  # (as long as the suite's servers)
    # What this module's stages use (MLflow for the tracked one, torch the probe looks for),
    # not the whole default list: about 4 s of CPU to start instead of 13.
    env[warm_server.PRELOAD_VAR] = "mlflow,torch"
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
    off_kind, _ = run_stage(server_env | {warm_start.ENABLED: "off"})
    assert off_kind == "Popen"


def test_a_forked_worker_takes_the_stages_environment(server_env, tmp_path, empty_store) -> None:
    """Each worker logs where its own stage says, not where the server's first stage did."""
    import mlflow

    store = new_store(empty_store, tmp_path, "other.db")
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
    make = {"MAKELEVEL": "1", "VENV": "/work/.venv", "NO_MKDOCS_2_WARNING": "1"}
    assert address(env | torchrun | make, "/repo") == base
    assert address(env | {"PATH": "/usr/bin:/usr/bin"}, "/repo") == base  # the same lookups
    assert address(env | {"PATH": "/bin:/usr/bin"}, "/repo") != base
    # A thread count as a whole number is the stage's own (its fork takes it); another form
    # is for a fresh process to read.
    assert address(env | {"OMP_NUM_THREADS": "2"}, "/repo") == base
    assert address({k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}, "/repo") == base
    assert address(env | {"OMP_NUM_THREADS": "4,2"}, "/repo") != base
    assert address(env | {"PYTHONPATH": "/repo:/lib"}, "/repo") != base
    assert address(env | {"MLFLOW_DISABLE_TELEMETRY": "false"}, "/repo") != base
    # What the stage's own code sets, with the values it sets, changes nothing...
    defaults = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_HTTP_REQUEST_TIMEOUT": "6"}
    assert address(env | defaults, "/repo") == base
    # MLflow reads its HTTP timeout and retries for each request.
    assert address(env | {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}, "/repo") == base
    # ... nor what libraries set when a test process imports them, nor the queue's workers.
    imported = {"TORCHINDUCTOR_CACHE_DIR": "/tmp/x", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    queue = {"CELERY_LOG_LEVEL": "20", "_MP_FORK_LOGLEVEL_": "20", "PIPELINE_TRACKING": "off"}
    assert address(env | imported | queue, "/repo") == base


def test_the_key_holds_the_process_limits() -> None:
    """A forked stage runs with the server's nice level: `nice dvc repro` needs its own."""
    env = {"PATH": "/usr/bin"}
    script = (
        "import json, os, sys\n"
        "from stages.core.common.warm_start import address\n"
        "os.nice(int(sys.argv[2]))\n"
        "print(address(json.loads(sys.argv[1]), '/r')[1:])\n"
    )

    def key(nice: int) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(env), str(nice)],
            cwd=REPO_ROOT,
            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert key(0) == address(env, "/r")[1:] != key(5)


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
    # Preloading nothing: what it would import is not what this test is about.
    env = new_server_env(mlflow_uri, idle_s=3) | {warm_server.PRELOAD_VAR: ""}
    start = "import os; from stages.core.common import warm_start as w; root = os.getcwd(); "
    start += "w._start_server(w.address(dict(os.environ), root), root)"
    subprocess.run(
        [sys.executable, "-c", start],
        cwd=REPO_ROOT,
        env=env | {"PYTHONPATH": str(REPO_ROOT)},
        check=True,
        timeout=60,
    )
    wait_for_server(env)
    up_since = time.monotonic()
    # Watched in the kernel's socket table: a connection would count as a request.
    while time.monotonic() - up_since < 30 and listening(env):
        time.sleep(0.2)
    assert 3 <= time.monotonic() - up_since < 30  # gone after its idle seconds, not before
    assert run_stage(env)[0] == "Popen"


def test_the_pipelines_own_server_forks_its_stages(pristine_repo, pipeline_env, checkout):
    """The server the pipeline's stages started (pristine_repo's cold run, the default
    PRELOAD: every library imported, as this module's own server does not) forks a stage of
    another checkout: no import left a thread running or a CUDA context."""
    seen, done = probe(pipeline_env, checkout, "exit:0")
    if seen["stage_pid"] is None:  # it idled out since the cold run: this probe started it
        wait_for_server(pipeline_env, checkout)
        seen, done = probe(pipeline_env, checkout, "exit:0")
    assert done.returncode == 0, done.stderr
    assert seen["stage_pid"] is not None and seen["torch_imported"]
    assert "great_expectations" in warm_server.preload_modules(pipeline_env)


def test_which_commands_are_handed_over() -> None:
    """``python [-u] -m stages.<module> [args]`` and nothing else: a stage, or the step
    `make pipeline` runs after the stages (each module decides by calling run_stage_warm)."""
    py = sys.executable
    assert warm_start.stage_command([py, "-m", "stages.train", "-x"]) == (
        "stages.train",
        ["-x"],
        False,
    )
    complete = [py, "-u", "-m", "stages.core.tracking.complete"]
    assert warm_start.stage_command(complete) == ("stages.core.tracking.complete", [], True)
    assert warm_start.stage_command([py, "-B", "-m", "stages.train"]) is None
    assert warm_start.stage_command([py, "-m", "dvc", "repro"]) is None
    assert warm_start.stage_command([py, "-m", "stages.bad-name"]) is None
    assert warm_start.stage_command([py, "-c", "import stages.train"]) is None


def test_what_a_server_preloads_is_a_setting() -> None:
    default = warm_server.preload_modules({})
    assert "torch" in default and "great_expectations" in default
    assert warm_server.preload_modules({warm_server.PRELOAD_VAR: ""}) == ()
    assert warm_server.preload_modules({warm_server.PRELOAD_VAR: "json, csv"}) == ("json", "csv")
    assert warm_server.preload_modules({warm_server.PRELOAD_VAR: " +lightgbm"}) == (
        *default,
        "lightgbm",
    )


def test_a_forked_stage_logs_inline_without_a_worker(stage_env, checkout) -> None:
    """A forked stage has mlflow imported, so it logs inline: start_worker forks no worker,
    but still runs the worker's warm-ups (here MLflow's map of our models' requirements alone,
    instead of every installed module, which MLflow builds when it first logs a model)."""
    seen, done = probe(stage_env, checkout, "track")
    assert done.returncode == 0, done.stderr
    assert seen["stage_pid"] is not None  # forked
    tracked = json.loads(done.stdout.splitlines()[1])
    assert tracked["worker"] is False
    assert tracked["torch_known"] and tracked["known"] < 50


# A stage of a copied checkout (stages/probe.py): what it finds when it starts, then what its
# first argument asks for.
PROBE = """\
import gc, json, os, signal, sys, time
from pathlib import Path

from stages.core.common.warm_start import STAGE_PID, run_stage_warm

if __name__ == "__main__":  # first, as every stage module does
    run_stage_warm()

umask = os.umask(0)
os.umask(umask)
seen = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "stage_pid": os.environ.get(STAGE_PID),
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "umask": umask,
    "torch_imported": "torch" in sys.modules,
    "frozen_objects": gc.get_freeze_count(),
    "stdin": sys.stdin.read(),
    "name": __name__,
    "unbuffered": sys.stdout.write_through,
}
print(json.dumps(seen), flush=True)
print("stage stderr", file=sys.stderr)
action = sys.argv[1]
if action.startswith("exit:"):
    sys.exit(int(action[5:]))
if action == "raise":
    raise ValueError("a stage that fails")
if action == "die":
    os.kill(os.getpid(), signal.SIGKILL)
if action == "track":
    from mlflow.utils import requirements_utils
    from stages.core.tracking import runs

    runs.start_worker("stages.core.tracking.serving:prepare")
    known = requirements_utils._MODULES_TO_PACKAGES or {}
    print(json.dumps({"worker": runs._started is not None, "torch_known": "torch" in known,
                      "known": len(known)}))
if action == "threads":
    import torch
    from threadpoolctl import threadpool_info

    pools = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    print(json.dumps({"torch": torch.get_num_threads(), **pools}))
if action == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    Path("stage.pid").write_text(str(os.getpid()))
    time.sleep(120)
"""
# What differs between a forked and a plain run of the probe by design.
PROCESS = {"pid", "ppid", "stage_pid", "torch_imported", "frozen_objects"}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of this checkout's stages/ with a probe stage in it."""
    root = tmp_path_factory.mktemp("probe-checkout")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "stages", root / "stages", ignore=ignore)
    (root / "stages/probe.py").write_text(PROBE)
    return root


def probe(
    env: dict, root: Path, *args: str, flags: tuple[str, ...] = ()
) -> tuple[dict, subprocess.CompletedProcess]:
    """``python [flags] -m stages.probe args`` in ``root``, as DVC runs a stage: what the
    stage saw and the finished process."""
    done = subprocess.run(
        [sys.executable, *flags, "-m", "stages.probe", *args],
        cwd=root,
        env=env,
        input="from stdin",
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stdout.splitlines()[0]), done


def start_probe(env: dict, root: Path, action: str, **options) -> subprocess.Popen:
    """``python -m stages.probe action`` in ``root``, running: stdin closed, ``options`` for
    Popen (its output, umask, session, signal dispositions)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.probe", action],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        **options,
    )


@pytest.fixture
def stage_env(server_env, checkout) -> dict:
    """``server_env`` once a probe stage has found its server listening."""
    probe(server_env, checkout, "exit:0")  # starts it when it idled out
    wait_for_server(server_env, checkout)
    return server_env


def test_a_forked_stage_takes_its_own_thread_count(stage_env, checkout) -> None:
    """torchrun's ranks (OMP_NUM_THREADS=1) fork from the server every other stage uses, and
    get the threads a fresh process would: torch's, the BLAS pool's and OpenMP's."""
    seen = {}
    for threads in ("1", "2", None):
        env = {k: v for k, v in stage_env.items() if k != "OMP_NUM_THREADS"}
        env |= {"OMP_NUM_THREADS": threads} if threads else {}
        for how, switch in (("forked", "on"), ("plain", "off")):
            stage, done = probe(env | {warm_start.ENABLED: switch}, checkout, "threads")
            assert done.returncode == 0, done.stderr
            assert (stage["stage_pid"] is not None) == (how == "forked")
            seen[threads, how] = json.loads(done.stdout.splitlines()[1])
    assert seen["1", "forked"] == seen["1", "plain"] == {"torch": 1, "blas": 1, "openmp": 1}
    assert seen["2", "forked"] == seen["2", "plain"] == {"torch": 2, "blas": 2, "openmp": 2}
    assert seen[None, "forked"] == seen[None, "plain"]


def test_a_stage_runs_forked_with_what_it_would_have_had(stage_env, checkout) -> None:
    seen, done = probe(stage_env, checkout, "exit:0", "more")
    assert done.returncode == 0, done.stderr
    assert seen["torch_imported"]  # preloaded: the warm fork, not a fresh interpreter
    # What the server preloaded is out of the garbage collector's sight (gc.freeze): no
    # collection in the stage walks, and so copies, the server's objects.
    assert seen["frozen_objects"] > 100_000
    assert seen["argv"] == [str(checkout / "stages/probe.py"), "exit:0", "more"]
    assert (seen["cwd"], seen["path0"]) == (str(checkout), str(checkout))
    assert seen["stdin"] == "from stdin" and seen["name"] == "__main__"
    assert done.stderr == "stage stderr\n"
    plain, done = probe(stage_env | {warm_start.ENABLED: "off"}, checkout, "exit:0", "more")
    assert done.returncode == 0 and done.stderr == "stage stderr\n"
    assert not plain["torch_imported"] and plain["stage_pid"] is None
    assert {k: v for k, v in plain.items() if k not in PROCESS} == {
        k: v for k, v in seen.items() if k not in PROCESS
    }


def test_the_stand_in_is_the_stage_for_lineage_and_lends_its_umask(stage_env, checkout) -> None:
    process = start_probe(stage_env, checkout, "exit:0", stdout=subprocess.PIPE, umask=0o027)
    seen = json.loads(process.stdout.readline().decode())
    assert process.wait(timeout=60) == 0
    assert seen["torch_imported"]
    assert seen["stage_pid"] == str(process.pid) != str(seen["pid"])
    assert seen["ppid"] != process.pid
    assert seen["umask"] == 0o027


@pytest.mark.parametrize(
    ("action", "returncode", "stderr"),
    [
        ("exit:3", 3, "stage stderr\n"),
        ("raise", 1, "ValueError: a stage that fails"),
        ("die", -signal.SIGKILL, "stage stderr\n"),
    ],
)
def test_the_stages_exit_status_is_the_stand_ins(
    stage_env, checkout, action, returncode, stderr
) -> None:
    seen, done = probe(stage_env, checkout, action)
    assert seen["torch_imported"]
    assert done.returncode == returncode
    assert stderr in done.stderr


def test_an_interpreter_option_means_a_plain_stage_but_u(stage_env, checkout) -> None:
    seen, done = probe(stage_env, checkout, "exit:0", flags=("-B",))
    assert done.returncode == 0 and not seen["torch_imported"]
    # torchrun starts its ranks with -u: forked, unbuffered as a plain `python -u` would be.
    forked, done = probe(stage_env, checkout, "exit:0", flags=("-u",))
    assert done.returncode == 0 and forked["torch_imported"] and forked["unbuffered"]
    off = stage_env | {warm_start.ENABLED: "off"}
    assert probe(off, checkout, "exit:0", flags=("-u",))[0]["unbuffered"]
    # Without -u, as the environment says (PYTHONUNBUFFERED), either way.
    forked = probe(stage_env, checkout, "exit:0")[0]
    assert forked["torch_imported"]
    assert forked["unbuffered"] == probe(off, checkout, "exit:0")[0]["unbuffered"]


def test_signals_reach_the_stage_and_a_killed_stand_in_takes_it_along(stage_env, checkout) -> None:
    def dispositions(ignore_hangups: bool) -> None:
        # As a shell starts it (pytest-xdist's workers ignore SIGINT, and a child inherits
        # that), or as `nohup` does.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if ignore_hangups else signal.SIG_DFL)

    def start(ignore_hangups: bool = False) -> tuple[subprocess.Popen, int]:
        (checkout / "stage.pid").unlink(missing_ok=True)
        process = start_probe(
            stage_env,
            checkout,
            "wait",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: dispositions(ignore_hangups),
        )
        deadline = time.monotonic() + 60
        while not (checkout / "stage.pid").exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        return process, int((checkout / "stage.pid").read_text())

    process, stage = start()
    assert stage != process.pid  # forked
    process.send_signal(signal.SIGTERM)  # the stage's handler exits 7
    assert process.wait(timeout=30) == 7

    process, stage = start()
    process.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt, then death by SIGINT
    assert process.wait(timeout=30) == -signal.SIGINT

    process, stage = start(ignore_hangups=True)
    assert stage != process.pid
    process.send_signal(signal.SIGHUP)  # ignored, by the stage too
    time.sleep(1)
    assert process.poll() is None and Path(f"/proc/{stage}").exists()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 7

    process, stage = start()
    os.killpg(process.pid, signal.SIGKILL)  # DVC's process group, as the e2e tests kill it
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{stage}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{stage}").exists()
