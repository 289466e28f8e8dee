"""Models in MLflow: the trained models logged as pyfunc models on their stage's run, and the
registry, where each evaluated fine-tuned model becomes a new version with the alias
``candidate``, and ``champion`` moves to it only when every gate passed and it beats the
champion.

``log_model`` and ``register`` run where MLflow runs (the tracking worker): a stage sends them
with ``run.send(log_model, ...)`` / ``run.call(register, ...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CANDIDATE = "candidate"
CHAMPION = "champion"
ACCURACY_TAG = "finetuned.accuracy"


def register_candidate(
    client,
    name: str,
    model_uri: str,
    accuracy: float,
    failures: list[str],
    tags: dict[str, Any],
) -> tuple[str, int]:
    """Register ``model_uri`` under ``name`` and move the aliases; returns one line saying what
    happened, and the new version. ``failures`` are the failed gates (empty: all passed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    version_tags = tags | {
        ACCURACY_TAG: f"{accuracy:.6f}",
        "gates": "passed" if not failures else "failed: " + "; ".join(failures),
    }
    # Through this client (the stage's store), not mlflow.register_model, which writes to the
    # process's default store and prints to stderr.
    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # registered by an earlier (or a parallel) execution
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    created = client.create_model_version(name, model_uri, tags=version_tags, model_id=model_id)
    version = int(created.version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        champion = None
    line = f"registered {name} version {version} as {CANDIDATE}"
    if failures:
        return f"{line}; gates failed, {CHAMPION} stays", version
    if champion is not None:
        best = float(champion.tags.get(ACCURACY_TAG, "-inf"))
        if accuracy <= best:
            stays = f"{CHAMPION} stays at version {champion.version}"
            return f"{line}; {stays} ({ACCURACY_TAG} {best:.4f} >= {accuracy:.4f})", version
    client.set_registered_model_alias(name, CHAMPION, version)
    return f"{line} and {CHAMPION} ({ACCURACY_TAG} {accuracy:.4f})", version


def log_model(recorder, model_dir: str, example_path: str) -> str:
    """Log a saved model directory as a pyfunc model on the stage's run (a few rows of the
    parquet split ``example_path`` as its input example); returns the model's URI."""
    import pandas as pd

    recorder.activate()
    features = json.loads((Path(model_dir) / "config.json").read_text())["feature_names"]
    example = pd.read_parquet(example_path, columns=features).head(5)
    from stages.core.serving import log_pyfunc

    info = log_pyfunc(model_dir, example)
    recorder.client.set_tag(recorder.run_id, "model_uri", info.model_uri)
    return info.model_uri


def register(
    recorder, model_dir: str, example_path: str, name: str, accuracy: float, failures: list
) -> str:
    """Register the fine-tuned model of this execution (the one logged by the run that
    produced ``model_dir``; logged here if that run is unknown to the store) and move the
    aliases. Returns one line saying what happened."""
    tags = recorder.parent_tags()
    producer = tags.get("run.finetune") or tags.get("cached.finetune")
    model_uri = None
    if producer and producer != "unknown":
        model_uri = recorder.client.get_run(producer).data.tags.get("model_uri")
    if model_uri is None:
        model_uri = log_model(recorder, model_dir, example_path)
    context = {k: v for k, v in recorder.context_tags().items() if not k.startswith("mlflow.")}
    version_tags = {"parent_run_id": recorder.parent_id or "", "evaluate_run_id": recorder.run_id}
    line, version = register_candidate(
        recorder.client, name, model_uri, accuracy, failures, version_tags | context
    )
    recorder.registered = f"models:/{name}/{version}"
    return line
