"""Shared fixtures for the unit tests.

Every test runs in its own temporary working directory with MLflow pointed at one SQLite store
shared by the session (creating a store costs seconds), and with every library's telemetry off,
so that no test writes into the repository or makes a network call.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from stages.core.common.telemetry import QUIET_ENV

# Imported where used: pytest-xdist's controller, which only hands tests out, loads this file
# too, and would spend about 3 s importing them before its workers start.
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from stages.core.common.params import Params
    from stages.core.modeling.model import Classifier, ModelConfig

# Before any test imports MLflow or Great Expectations, which may read these at import time.
os.environ.update(QUIET_ENV)
# The text tests build their checkpoints locally: nothing may come from the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# The venv's bin first on PATH, as in a shell that activated it (`python` and `dvc` are then
# this interpreter's). The warm server's key includes PATH: this way the stages a test starts
# itself (`python -m stages.<name>`) and those `dvc` starts share one server, instead of each
# kind preloading its own (about 11 s of CPU).
VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([VENV_BIN, *filter(None, [os.environ.get("PATH")])])
# The warm servers the tests start outlive the gaps between the e2e tests (a
# server that idled out costs its imports again), and exit 10 minutes after their last stage.
os.environ.setdefault("PIPELINE_WARM_SERVER_IDLE", "600")


def _exit_without_teardown(worker_pid: int) -> None:
    """End a pytest-xdist worker once the exit handlers registered after this one have run,
    skipping the interpreter's teardown: freeing the modules and objects of torch, MLflow, GX
    and hundreds of tests takes a worker 2-5 s of CPU after its results are all sent, and the
    run waits for it. Only in the worker itself: a process it forked exits as it would."""
    if os.getpid() != worker_pid:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pytest_configure(config: pytest.Config) -> None:
    """Settings of the processes that run tests (not pytest-xdist's controller)."""
    if hasattr(config, "workerinput"):
        # Here, not at import: a child process that imports conftest (some tests run
        # `python -c "from test_x import ..."`) keeps its own exit status. Registered before
        # the libraries the tests import register theirs, so it runs after them.
        atexit.register(_exit_without_teardown, os.getpid())
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch
    from hypothesis import settings

    # The models under test are tiny: extra intra-op threads only add contention (on a busy
    # 2-core machine a 4-16-3 MLP trains ~20x slower with two threads than with one).
    torch.set_num_threads(1)
    # Property tests explore new examples on every local run; in CI (GitHub sets CI, so does
    # .ci/run) they replay the same ones, so that a pull request fails for its own change only.
    settings.register_profile("ci", derandomize=True)
    settings.load_profile("ci" if os.environ.get("CI") else "default")


REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["f0", "f1", "f2", "f3"]
CLASSES = [0, 1, 2]
DOMAINS = ["base", "target"]
ROWS_PER_PAIR = 12  # rows per (domain, class)
TEST_EXPERIMENT = "unit-tests"


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A folder holding an MLflow store as MLflow creates it (``mlflow.db``: its tables and
    Default experiment), built once per test run (``built_once``). ``new_store`` copies it
    where a test needs a store of its own, sparing MLflow's 3-4 s of schema migrations each
    time; a fresh clone's first run still creates its store (test_mlflow_e2e.py)."""

    # Imported before the lock, not in build(): a worker that waits for another's build
    # imports MLflow (which nearly every worker needs) meanwhile, on the other core.
    from mlflow.tracking import MlflowClient

    def build(target: Path) -> None:
        target.mkdir(parents=True)
        # From inside it: the Default experiment's artifact location (./mlruns/0) is then
        # under the folder, which each copy rewrites, not under the checkout.
        with contextlib.chdir(target):
            assert MlflowClient(f"sqlite:///{target / 'mlflow.db'}").search_experiments()

    return built_once(tmp_path_factory, "empty-store", build)


def new_store(empty_store: Path, target: Path, name: str = "mlflow.db") -> str:
    """A copy of ``empty_store``'s store at ``target / name``, and its tracking URI."""
    target.mkdir(parents=True, exist_ok=True)
    copy_mlflow_store(empty_store, target, name)
    return f"sqlite:///{target / name}"


@pytest.fixture(scope="session")
def mlflow_dir(tmp_path_factory, empty_store: Path) -> Path:
    """The directory of the session's MLflow store (``mlflow.db``)."""
    folder = tmp_path_factory.mktemp("mlflow")
    new_store(empty_store, folder)
    return folder


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_dir: Path) -> str:
    return f"sqlite:///{mlflow_dir / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path: Path, mlflow_uri: str) -> Path:
    """Telemetry off, MLflow on the session store, no DVC variables, cwd = tmp_path."""
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.fixture(scope="session")
def mlflow_client(mlflow_uri: str, mlflow_dir: Path):
    """A client on the session store, whose test experiment keeps artifacts beside the store."""
    import mlflow

    # MLflow caches the store per URI with its default artifact root (./mlruns) resolved
    # against the cwd of its first use: make that the store's directory, not the repo.
    with contextlib.chdir(mlflow_dir):
        client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
        if client.get_experiment_by_name(TEST_EXPERIMENT) is None:
            artifacts = (mlflow_dir / "artifacts").as_uri()
            client.create_experiment(TEST_EXPERIMENT, artifact_location=artifacts)
    return client


@pytest.fixture
def params() -> Params:
    from stages.core.common.params import parse_params

    return parse_params({})


def make_raw_frame(rows_per_pair: int = ROWS_PER_PAIR, seed: int = 0) -> pd.DataFrame:
    """A frame in the canonical raw schema: float features in [0, 16], ``label``, ``domain``.

    Each class has its own centre, so that the data is learnable; a ``uid`` is not included
    (tests that need row identity add one).
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    parts = []
    for domain in DOMAINS:
        for label in CLASSES:
            centre = 3.0 + 5.0 * label
            x = np.clip(rng.normal(centre, 1.0, size=(rows_per_pair, len(FEATURES))), 0, 16)
            part = pd.DataFrame(x, columns=FEATURES)
            part["label"] = label
            part["domain"] = domain
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture
def raw_frame() -> pd.DataFrame:
    """72 rows: 2 domains x 3 classes x 12 rows, 4 numeric features, ``label``, ``domain``."""
    return make_raw_frame()


def make_blobs(n_per_class: int, seed: int, n_classes: int = 3, n_features: int = 4):
    """Well-separated Gaussian blobs as float32 features and int64 class indices.

    The class centres are fixed; ``seed`` draws the samples, so draws with different seeds
    are train/val samples of one problem.
    """
    import numpy as np
    import torch

    centres = np.random.default_rng(0).normal(0, 4, size=(n_classes, n_features))
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.5, size=(n_per_class, n_features)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    order = rng.permutation(len(y))
    return torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])


@pytest.fixture
def blobs():
    """(train, val) tensors of a 3-class, 4-feature problem: 30 + 10 rows per class."""
    return make_blobs(30, seed=1), make_blobs(10, seed=2)


def make_config(
    x: np.ndarray | torch.Tensor,
    classes: list | None = None,
    hidden: list[int] | None = None,
    scaling: str = "per_feature",
    dropout: float = 0.0,
) -> ModelConfig:
    import numpy as np

    from stages.core.modeling.model import ModelConfig, fit_scaling

    x = np.asarray(x, dtype=np.float64)
    mean, std = fit_scaling(x, scaling)
    n_features = x.shape[1]
    return ModelConfig(
        arch="mlp",
        n_features=n_features,
        hidden=hidden or [16],
        dropout=dropout,
        classes=classes if classes is not None else CLASSES,
        feature_names=[f"f{i}" for i in range(n_features)],
        mean=mean,
        std=std,
    )


def make_model(config: ModelConfig, seed: int = 0) -> Classifier:
    import torch

    from stages.core.modeling.model import Classifier

    torch.manual_seed(seed)
    return Classifier(config)


# What the ranks of the tests' two-process runs import first: a forkserver imports it once per
# test process, and each rank starts from a fork of it instead of a fresh interpreter.
RANK_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "pandas", "transformers"]


def spawn_ranks(fn, args: tuple, nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, the ranks forked from a forkserver
    that has imported ``RANK_PRELOAD`` (a spawned rank spends ~4 s importing torch)."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- End-to-end: the real `dvc` on a temporary git repo holding a copy of the project ---------

PIPELINE_STAGES = ["ingest", "validate", "split", "tokenize", "train", "finetune", "evaluate"]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "data/source", "data/suites", ".dvcignore"]
PROJECT_FILES += [".dvc/config", ".dvc/plots", ".gitignore"]
# The local MLflow store records absolute paths (copy_mlflow_store rewrites them), and DVC's tmp
# holds locks and queue state: a copy never writes into the original.
NOT_COPIED = ("mlflow.db", ".mlflow.db.lock", "mlartifacts", "tmp", "__pycache__")
GIT_ID = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
# For experiments on ``pristine_repo`` whose tests check what reran and what was tracked, not
# the transfer intervals: two shot draws (not five; each is a fine-tune and a scratch fit) and
# 200 bootstrap resamples (not 2000). evaluate reruns in those experiments anyway.
LEAN_EVALUATE = ["-S", "evaluate.draws=2", "-S", "evaluate.bootstrap_resamples=200"]
COMMAND_TIMEOUT = 600  # seconds; a hung `dvc` fails its test instead of waiting for CI's limit


def run_command(
    cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run ``cmd`` with a timeout; with ``check``, fail the test showing its output."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran, in pipeline order."""
    return [s for s in PIPELINE_STAGES if f"Running stage '{s}'" in output]


def commit_all(repo: Path, env: dict, message: str) -> None:
    run_command(["git", "add", "-A"], repo, env)
    run_command(["git", *GIT_ID, "commit", "-qm", message, "--allow-empty"], repo, env)


def run_queued_experiments(
    repo: Path, env: dict, settings: list[str], jobs: int = 2, timeout: float = 900
) -> str:
    """Queue one experiment per ``-S`` setting, run them with ``dvc queue start -j jobs`` and
    wait until none is queued or running; returns ``dvc queue status``."""
    import time

    expected = len(settings) + finished_experiments(repo, env)[0]
    for setting in settings:
        run_command(["dvc", "exp", "run", "--queue", "-S", setting], repo, env)
    # The queue's workers are daemons: they would hold captured pipes open, and the test with them.
    started = subprocess.run(
        ["dvc", "queue", "start", "-j", str(jobs)],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=COMMAND_TIMEOUT,
    )
    assert started.returncode == 0, "dvc queue start failed"
    status = ["dvc", "queue", "status"]
    deadline, asked = time.monotonic() + timeout, 0.0
    try:
        while time.monotonic() < deadline:
            # `dvc queue status` is a whole `dvc` process (about a CPU-second): ask it once git
            # shows every experiment or a failure (a git process: milliseconds), then every 5 s.
            finished, failed = finished_experiments(repo, env)
            if (finished >= expected or failed) and time.monotonic() - asked >= 5:
                shown, asked = run_command(status, repo, env).stdout, time.monotonic()
                if "Queued" not in shown and "Running" not in shown:
                    return shown
            time.sleep(0.5)
        shown = run_command(status, repo, env).stdout
        raise AssertionError(f"queued experiments still running after {timeout} s:\n{shown}")
    finally:
        run_command(["dvc", "queue", "stop"], repo, env, check=False)  # no idle workers left


def finished_experiments(repo: Path, env: dict) -> tuple[int, bool]:
    """How many experiments the repo holds, from git's refs ``refs/exps/<sha[:2]>/<sha[2:]>/
    <name>`` (written when DVC collects an experiment's results), and whether DVC's queue has
    stashed a failed one (``refs/exps/celery/failed``, dvc/repo/experiments/refs.py)."""
    refs = run_command(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env)
    names = refs.stdout.split()
    count = sum(len(p) == 5 and len(p[2]) == 2 for p in (n.split("/") for n in names))
    return count, "refs/exps/celery/failed" in names


def set_params(repo: Path, **sections: dict) -> None:
    """Update sections of the repo's params.yaml (``set_params(repo, train={"epochs": 3})``)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section] = params.get(section, {}) | values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def pipeline_env() -> dict:
    """The environment of a user's shell: the project's venv first on PATH (so that `python`
    in dvc.yaml is this interpreter), telemetry off, no MLflow or DVC variables of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | QUIET_ENV  # (PATH: the venv's bin first, set above for the whole session)


def copy_project(source: Path, target: Path, files: list[str] | None = None) -> Path:
    """Copy ``files`` (default: a whole repo made by these fixtures, with its own copy of the
    MLflow store) from ``source``."""
    ignore = shutil.ignore_patterns(*NOT_COPIED)
    for name in files if files is not None else os.listdir(source):
        src, dst = source / name, target / name
        if name in NOT_COPIED:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, dst)
    if files is None and (source / "mlflow.db").is_file():
        copy_mlflow_store(source, target)
    return target


def copy_mlflow_store(source: Path, target: Path, name: str = "mlflow.db") -> None:
    """Copy the local store (``mlflow.db`` + ``mlartifacts/``) of repo ``source`` into repo
    ``target`` (as ``name``), pointing every absolute path it records at the copy."""
    import sqlite3

    shutil.copy2(source / "mlflow.db", target / name)
    if (source / "mlartifacts").is_dir():
        shutil.copytree(source / "mlartifacts", target / "mlartifacts")
    old, new = str(source.resolve()), str(target.resolve())
    with contextlib.closing(sqlite3.connect(target / name)) as db, db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            for column in db.execute(f"pragma table_info('{table}')").fetchall():
                name, kind = column[1], column[2].upper()
                if "CHAR" in kind or "TEXT" in kind:
                    db.execute(
                        f'update "{table}" set "{name}" = replace("{name}", ?, ?) '
                        f'where "{name}" like ?',
                        (old, new, f"%{old}%"),
                    )


def new_project_repo(target: Path, env: dict, empty_store: Path | None = None) -> Path:
    """A new git repo at ``target`` holding the project's code, params and DVC config, committed
    (nothing run yet); with ``empty_store``, a copy of it as the repo's MLflow store (not in
    git, as ``mlflow.db`` never is)."""
    repo = copy_project(REPO_ROOT, target, PROJECT_FILES)
    run_command(["git", "init", "-q", "-b", "main"], repo, env)
    commit_all(repo, env, "project")
    if empty_store is not None:
        new_store(empty_store, repo)
    return repo


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once per test run at a path every pytest-xdist worker sees, and the path.

    Session fixtures are per worker: without this, each worker would build its own copy of an
    expensive one (a cold pipeline run is about a minute of CPU). The first worker to ask builds
    it under a file lock while the others wait; a build that failed is tried again by the next.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    target, done = base / name, base / f"{name}.done"
    with FileLock(base / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)  # what a failed build left
            build(target)
            done.touch()
    return target


# A server's key ignores where the checkout is (warm_start.address): the one started here for
# ``env`` is the one the pipeline's stages run under ``env`` look for, in any copy of the repo.
# (warm_start's own starter, as a stage that finds no server calls it.)
WARM_SERVER_STARTER = """
import os, sys
from stages.core.common import warm_start
name = warm_start.address(dict(os.environ), sys.argv[1])
if "@" + name[1:] not in open("/proc/net/unix").read():  # (a connection would be a request)
    warm_start._start_server(name, sys.argv[1])
"""


def start_warm_server(env: dict) -> None:
    """Start the warm server of the stages run with ``env`` in the background, unless one is
    there (what the first stage would do, ahead of it); nothing where stages run without one."""
    from stages.core.common import warm_start

    if warm_start.enabled(env):
        run_command([sys.executable, "-c", WARM_SERVER_STARTER, str(REPO_ROOT)], REPO_ROOT, env)


def wait_for_warm_server(env: dict, timeout: float = 60) -> bool:
    """Whether the warm server of the stages run with ``env`` listens within ``timeout``
    seconds (if it does not, the stages run the plain way)."""
    import time

    from stages.core.common import warm_start

    if not warm_start.enabled(env):
        return False
    name = "@" + warm_start.address(env, str(REPO_ROOT))[1:]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The kernel's socket table: the name is bound while the server preloads, and flagged
        # as accepting connections (__SO_ACCEPTCON) once it listens.
        for line in Path("/proc/net/unix").read_text().splitlines():
            fields = line.split()
            if fields[-1] == name and int(fields[3], 16) & 0x10000:
                return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def pristine_repo(tmp_path_factory, pipeline_env: dict, empty_store: Path) -> Path:
    """A git repo with the project's code and default params after one cold `dvc repro`, its
    outputs committed. Shared by the whole run (built once, see ``built_once``): tests read it;
    tests that change anything work on ``pipeline_repo``, a private copy."""

    def build(target: Path) -> None:
        # The stages' warm server preloads while the repo is made: then every stage of the cold
        # run, ingest and validate too, is forked instead of importing its libraries (and its
        # tracking worker mlflow) afresh (the cold-run test alone: 35 s of CPU instead of 54).
        start_warm_server(pipeline_env)
        repo = new_project_repo(target, pipeline_env, empty_store)
        wait_for_warm_server(pipeline_env)
        cold = run_command(["dvc", "repro"], repo, pipeline_env)
        assert ran_stages(cold.stdout) == PIPELINE_STAGES, cold.stdout
        (repo / "cold_repro.log").write_text(cold.stdout)
        commit_all(repo, pipeline_env, "outputs")

    return built_once(tmp_path_factory, "pristine", build)


@pytest.fixture
def pipeline_repo(pristine_repo: Path, tmp_path: Path) -> Path:
    """A private copy of ``pristine_repo`` (git history, DVC cache and outputs, the MLflow
    store) that the test may change at will."""
    return copy_project(pristine_repo, tmp_path / "repo")


@pytest.fixture(scope="session")
def finetune_experiment(pristine_repo: Path, pipeline_env: dict, tmp_path_factory):
    """``dvc exp run -S finetune.lr=0.005`` (with ``LEAN_EVALUATE``) on a copy of
    ``pristine_repo``, shared by the tests that read what it did (the repo, the output, the
    metrics before), on every worker (``built_once``): they must not change it."""
    from types import SimpleNamespace

    def build(target: Path) -> None:
        repo = copy_project(pristine_repo, target / "repo")
        before = {
            name: json.loads((repo / f"metrics/{name}.json").read_text())
            for name in ("finetune", "evaluate")
        }
        done = run_command(
            ["dvc", "exp", "run", "-S", "finetune.lr=0.005", *LEAN_EVALUATE], repo, pipeline_env
        )
        (target / "output.log").write_text(done.stdout)
        (target / "before.json").write_text(json.dumps(before))

    folder = built_once(tmp_path_factory, "finetune_exp", build)
    return SimpleNamespace(
        repo=folder / "repo",
        output=(folder / "output.log").read_text(),
        before=json.loads((folder / "before.json").read_text()),
    )


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT (WordPiece) and GPT-2 (byte-level BPE, no pad token) checkpoint folder,
    built once per session from configs and tokenizers trained on the tests' own texts."""
    from tiny_text import build_bert, build_gpt2

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {"bert": build_bert(root / "bert"), "gpt2": build_gpt2(root / "gpt2")}
