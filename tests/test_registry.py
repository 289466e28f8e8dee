"""Models in MLflow: the pyfunc model (loads without pickle, predicts labels and probabilities
from raw feature rows) and the registry's candidate / champion aliases (real SQLite store)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEST_EXPERIMENT, make_blobs, make_config, make_model

from stages.core.engine.inference import predict
from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.model import save_model
from stages.core.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    create_version,
    log_model,
    move_aliases,
)
from stages.core.tracking.runs import stage_run

FEATURES = ["f0", "f1", "f2", "f3"]


def register_candidate(client, name, model_uri, accuracy, failures, tags) -> tuple[str, int]:
    """What evaluate's register then promote do, on a model already logged."""
    version = create_version(client, name, model_uri, tags)
    return move_aliases(client, name, version, accuracy, failures), version


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A trained 3-class model with string classes, saved; a parquet split of raw rows."""
    folder = tmp_path_factory.mktemp("model")
    (x, y), val = make_blobs(20, seed=1), make_blobs(10, seed=2)
    config = make_config(x, classes=["ant", "bee", "cat"])
    model = make_model(config)
    fit(model, (x, y), val, FitOptions(epochs=30, batch_size=16, lr=0.02, device="cpu"))
    save_model(folder / "model", model, config)
    frame = pd.DataFrame(val[0].numpy().astype(np.float64), columns=FEATURES)
    frame["label"] = [config.classes[i] for i in val[1].tolist()]
    frame.to_parquet(folder / "split.parquet")
    expected = [config.classes[i] for i in predict(model, val[0]).tolist()]
    return folder / "model", folder / "split.parquet", frame.assign(expected=expected)


@pytest.fixture(scope="module")
def logged_uri(saved_model, mlflow_uri: str) -> str:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # module scope: before the autouse fixture
    model_dir, split, _ = saved_model
    with stage_run("train", TEST_EXPERIMENT, {}, background=False) as run:
        uri = run.call(log_model, model_dir, split)
    return uri


def test_pyfunc_model_predicts_labels_from_raw_rows(saved_model, logged_uri: str) -> None:
    import mlflow.pyfunc

    _, _, frame = saved_model
    loaded = mlflow.pyfunc.load_model(logged_uri)
    for rows in (frame.iloc[:1], frame.iloc[:7], frame):  # any batch size
        labels = loaded.predict(rows[FEATURES])
        assert list(labels) == rows["expected"].tolist()
    shuffled = frame[FEATURES[::-1]]  # columns are found by name
    assert list(loaded.predict(shuffled)) == frame["expected"].tolist()


def test_pyfunc_labels_keep_the_input_index(saved_model, logged_uri: str) -> None:
    """A filtered frame (index 5, 9, 17, ...): each label lands on its own row."""
    import mlflow.pyfunc

    _, _, frame = saved_model
    rows = frame.iloc[[5, 9, 17, 3]]
    labels = mlflow.pyfunc.load_model(logged_uri).predict(rows[FEATURES])
    assert list(labels.index) == [5, 9, 17, 3]
    assigned = rows.assign(pred=labels)
    assert assigned["pred"].tolist() == rows["expected"].tolist()


def test_pyfunc_model_gives_probabilities(saved_model, logged_uri: str) -> None:
    import mlflow.pyfunc

    _, _, frame = saved_model
    probabilities = mlflow.pyfunc.load_model(logged_uri).predict(
        frame[FEATURES], params={"probabilities": True}
    )
    assert list(probabilities.columns) == ["ant", "bee", "cat"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert probabilities.idxmax(axis=1).tolist() == frame["expected"].tolist()


def test_pyfunc_model_loads_without_pickle(logged_uri: str, tmp_path: Path) -> None:
    import mlflow.artifacts
    from safetensors.torch import load_file

    local = Path(mlflow.artifacts.download_artifacts(logged_uri, dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
    weights = [f for f in files if f.endswith("model.safetensors")]
    assert len(weights) == 1
    assert all(isinstance(t, torch.Tensor) for t in load_file(str(local / weights[0])).values())
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements)
    assert any(r.startswith("safetensors==") for r in requirements)


def test_pyfunc_model_names_missing_columns(saved_model, logged_uri: str) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    _, _, frame = saved_model
    with pytest.raises(MlflowException, match="f3"):
        mlflow.pyfunc.load_model(logged_uri).predict(frame[FEATURES[:3]])


def test_champion_moves_only_for_a_better_model_that_passed(logged_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    name = f"registry-{uuid.uuid4().hex[:8]}"

    def aliases() -> dict[str, int]:
        return {
            a: client.get_model_version_by_alias(name, a).version for a in (CANDIDATE, CHAMPION)
        }

    line, version = register_candidate(client, name, logged_uri, 0.80, [], {"git.commit": "abc"})
    assert version == 1
    assert (
        line == f"registered {name} version 1 as candidate and champion (finetuned.accuracy 0.8000)"
    )
    assert aliases() == {CANDIDATE: 1, CHAMPION: 1}

    line, _ = register_candidate(client, name, logged_uri, 0.70, [], {})
    assert aliases() == {CANDIDATE: 2, CHAMPION: 1}
    assert line.endswith("champion stays at version 1 (finetuned.accuracy 0.8000 >= 0.7000)")

    failed = ["evaluate.min_transfer_gain: finetuned - scratch 0.0100 < 0.03"]
    line, _ = register_candidate(client, name, logged_uri, 0.95, failed, {})
    assert aliases() == {CANDIDATE: 3, CHAMPION: 1}  # a failed gate never promotes
    assert line.endswith("gates failed, champion stays")
    assert client.get_model_version(name, "3").tags["gates"] == f"failed: {failed[0]}"

    register_candidate(client, name, logged_uri, 0.80, [], {})  # a tie keeps the champion
    assert aliases() == {CANDIDATE: 4, CHAMPION: 1}

    register_candidate(client, name, logged_uri, 0.90, [], {})
    assert aliases() == {CANDIDATE: 5, CHAMPION: 5}
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert champion.tags["finetuned.accuracy"] == "0.900000"
    assert champion.tags["gates"] == "passed"
    assert client.get_model_version(name, "1").tags["git.commit"] == "abc"


class _Racer:
    """A real client on the test store whose first move of the champion waits until the other
    promotion has also read the champion and decided (a barrier), and, for the promotion told
    to go last, until the other one has moved it."""

    def __init__(self, barrier, after=None, then=None) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient()
        self._barrier, self._after, self._then = barrier, after, then
        self._moved = False

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def set_registered_model_alias(self, name: str, alias: str, version) -> None:
        first = alias == CHAMPION and not self._moved
        if first:
            self._moved = True
            self._barrier.wait(timeout=60)
            if self._after is not None:
                assert self._after.wait(timeout=60)
        self._client.set_registered_model_alias(name, alias, version)
        if first and self._then is not None:
            self._then.set()


def test_racing_promotions_leave_the_better_model_champion(logged_uri: str) -> None:
    """Two evaluate stages promote at once (`dvc queue start -j 2`): both read the champion
    before either moves it, and the worse one moves it last; the better one ends champion."""
    import threading

    from mlflow import MlflowClient

    client = MlflowClient()
    name = f"race-{uuid.uuid4().hex[:8]}"
    register_candidate(client, name, logged_uri, 0.50, [], {})  # version 1, the champion
    worse = create_version(client, name, logged_uri, {"gates": "pending"})
    better = create_version(client, name, logged_uri, {"gates": "pending"})
    barrier, better_moved = threading.Barrier(2), threading.Event()
    racers = {
        worse: (_Racer(barrier, after=better_moved), 0.80),
        better: (_Racer(barrier, then=better_moved), 0.90),
    }
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        racer, accuracy = racers[version]
        try:
            move_aliases(racer, name, version, accuracy, [])
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
            barrier.abort()
            better_moved.set()

    threads = [threading.Thread(target=promote, args=(v,)) for v in (worse, better)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert all(racer._moved for racer, _ in racers.values())  # both did move it
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert int(champion.version) == better
    assert champion.tags["finetuned.accuracy"] == "0.900000"


def test_prepare_keeps_mlflows_requirement_check(monkeypatch, capfd) -> None:
    """serving.prepare gives MLflow a module map of our requirements only (not the 0.7-0.8 s
    scan of every installed package): logging and loading a model still checks each of them
    against the installed versions, and finds each module by its distribution's name (pyyaml
    as yaml) where the metadata is missing."""
    from mlflow.utils import requirements_utils

    from stages.core.tracking.serving import prepare, requirements

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    prepare()
    modules = requirements_utils._MODULES_TO_PACKAGES
    assert modules["yaml"] == ["pyyaml"] and modules["torch"] == ["torch"]
    assert "sklearn" not in modules  # the scan of every package did not run
    pins = requirements(text=True, adapter=True)
    assert all("==" in pin for pin in pins), pins  # every requirement is installed and pinned
    capfd.readouterr()
    requirements_utils.warn_dependency_requirement_mismatches(pins)
    assert "mismatches" not in capfd.readouterr().err  # MLflow warns on stderr
    # Where a distribution's metadata is missing, MLflow imports the module the map names:
    # pyyaml is found as yaml (without the map it would import "pyyaml" and call it uninstalled).
    metadata = requirements_utils.importlib_metadata
    found = metadata.version

    def version(name: str) -> str:
        if name == "pyyaml":
            raise metadata.PackageNotFoundError(name)
        return found(name)

    monkeypatch.setattr(metadata, "version", version)
    yaml_pin = next(pin for pin in pins if pin.startswith("pyyaml=="))
    requirements_utils.warn_dependency_requirement_mismatches([yaml_pin])
    assert "mismatches" not in capfd.readouterr().err
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", {})
    requirements_utils.warn_dependency_requirement_mismatches([yaml_pin])
    assert "pyyaml (current: uninstalled" in capfd.readouterr().err
    requirements_utils.warn_dependency_requirement_mismatches(["torch==0.0.1", "pyyaml==1"])
    warned = capfd.readouterr().err
    assert "torch (current: " in warned and "pyyaml (current: " in warned
