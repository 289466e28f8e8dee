"""Models in MLflow: the trained models logged as pyfunc models on their stage's run, and the
registry, where each evaluated fine-tuned model becomes a new version with the alias
``candidate``, and ``champion`` moves to it only when every gate passed and it beats the
champion.

``log_model``, ``register`` and ``promote`` run where MLflow runs (the tracking worker): a stage
sends them with ``run.send(log_model, ...)``. evaluate registers the version first, so that
MLflow's own evaluation of it runs while the stage computes its metrics, and promotes it last."""

from __future__ import annotations

from typing import Any

from stages.core.common.schema import TEXT

CANDIDATE = "candidate"


CHAMPION = "champion"


ACCURACY_TAG = "finetuned.accuracy"


GATES_TAG = "gates"


def create_version(client, name: str, model_uri: str, tags: dict[str, Any]) -> int:
    """A new version of registered model ``name`` (created if missing) from ``model_uri``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    # Through this client (the stage's store), not mlflow.register_model, which writes to the
    # process's default store and prints to stderr.
    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # registered by an earlier (or a parallel) execution
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    created = client.create_model_version(name, model_uri, tags=tags, model_id=model_id)
    return int(created.version)


# Rounds of read, compare and move before a promotion gives up settling the champion: each
# round that moves it follows a version that another promotion tagged meanwhile.
SETTLE_ROUNDS = 20


def move_aliases(client, name: str, version: int, accuracy: float, failures: list[str]) -> str:
    """Record the gates on ``version``, make it the candidate, and the champion when every gate
    passed and its accuracy beats the champion's (or there is none); one line says what
    happened. ``failures`` are the failed gates (empty: all passed).

    Safe for promotions that run at once on one store (`dvc queue start -j 2`): MLflow has no
    compare-and-swap, so each promotion settles the champion (see settle_champion) after its
    own version's tags are written; whichever settles last reads every version tagged before
    it, and all of them agree on the best."""
    client.set_model_version_tag(name, str(version), ACCURACY_TAG, f"{accuracy:.6f}")
    gates = "passed" if not failures else "failed: " + "; ".join(failures)
    client.set_model_version_tag(name, str(version), GATES_TAG, gates)
    client.set_registered_model_alias(name, CANDIDATE, version)
    from stages.core.tracking.store import local_store_lock

    with local_store_lock():  # on one machine's SQLite store the promotions also take turns
        champion = settle_champion(client, name)
    line = f"registered {name} version {version} as {CANDIDATE}"
    if failures:
        return f"{line}; gates failed, {CHAMPION} stays"
    if champion is not None and int(champion.version) == version:
        return f"{line} and {CHAMPION} ({ACCURACY_TAG} {accuracy:.4f})"
    best = _accuracy(champion) if champion is not None else float("-inf")
    stays = f"{CHAMPION} stays at version {champion.version}"
    return f"{line}; {stays} ({ACCURACY_TAG} {best:.4f} >= {accuracy:.4f})"


def settle_champion(client, name: str):
    """Point ``champion`` at the best version that passed its gates (the highest accuracy; on a
    tie the champion stays, else the oldest wins), re-reading after each move until a read
    finds it already there; returns the champion's ModelVersion (None when no version passed).

    Convergent rather than atomic: a promotion that read before another's version was tagged
    may move the alias to a worse version, but the other one reads after its own tags and
    moves it back, and each promotion's last step is a read that found the champion best."""
    champion = None
    for _ in range(SETTLE_ROUNDS):
        champion = _champion(client, name)
        current = int(champion.version) if champion is not None else None
        best = _best_version(client.search_model_versions(f"name = '{name}'"), current)
        if best is None or int(best.version) == current:
            return champion
        client.set_registered_model_alias(name, CHAMPION, int(best.version))
    return _champion(client, name)


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        return None


def _accuracy(version) -> float:
    try:
        return float(version.tags.get(ACCURACY_TAG, "-inf"))
    except ValueError:  # a hand-edited tag: never better than a measured one
        return float("-inf")


def _best_version(versions, current: int | None):
    """The version that passed its gates with the highest accuracy; among equals, the current
    champion, else the oldest."""
    passed = [v for v in versions if v.tags.get(GATES_TAG) == "passed"]
    if not passed:
        return None
    return max(passed, key=lambda v: (_accuracy(v), int(v.version) == current, -int(v.version)))


def log_model(recorder, model_dir: str, example_path: str) -> str:
    """Log a saved model directory as a pyfunc model on the stage's run (a few rows of the
    parquet split ``example_path`` as its input example); returns the model's URI."""
    import pandas as pd

    from stages.core.tracking.serving import log_pyfunc, model_config

    recorder.activate()
    config = model_config(model_dir)
    if config.get("text"):  # the split's canonical text column, named as the model takes it
        example = pd.read_parquet(example_path, columns=[TEXT]).head(5)
        example = example.rename(columns={TEXT: config["text_column"]})
    else:
        example = pd.read_parquet(example_path, columns=config["feature_names"]).head(5)

    info = log_pyfunc(model_dir, example)
    recorder.client.set_tag(recorder.run_id, "model_uri", info.model_uri)
    return info.model_uri


def provenance_tags(model_dir: str) -> dict[str, str]:
    """A text model's base checkpoint as version tags (``base.pretrained``, ``base.revision``,
    ``base.sha256``), each within MLflow's length limit; none for the other models."""
    from stages.core.tracking.recorder import shorten
    from stages.core.tracking.serving import model_config

    provenance = model_config(model_dir).get("provenance") or {}
    return {
        f"base.{key}": shorten("null" if value is None else str(value), TAG_LIMIT)
        for key, value in provenance.items()
    }


# MLflow's limit on a model version's tag value (mlflow.utils.validation); kept far below it.
TAG_LIMIT = 5000


def register(recorder, model_dir: str, example_path: str, name: str) -> None:
    """Register the fine-tuned model of this execution as a new version of ``name`` (gates
    pending): the model logged by the run that produced ``model_dir``, or logged here if that
    run is unknown to the store. ``promote`` finishes it."""
    producer = recorder.producer("finetune")  # this execution's finetune, or an earlier one
    model_uri = None
    if producer:
        model_uri = recorder.client.get_run(producer).data.tags.get("model_uri")
    if model_uri is None:
        model_uri = log_model(recorder, model_dir, example_path)
    context = {k: v for k, v in recorder.context_tags().items() if not k.startswith("mlflow.")}
    version_tags = {"parent_run_id": recorder.parent_id or "", "evaluate_run_id": recorder.run_id}
    version_tags |= context | {GATES_TAG: "pending"} | provenance_tags(model_dir)
    version = create_version(recorder.client, name, model_uri, version_tags)
    recorder.registered = (name, version)


def promote(recorder, accuracy: float, failures: list[str]) -> None:
    """Gates, candidate and champion for the version ``register`` made; the line that says
    what happened becomes one of the stage's notes."""
    name, version = recorder.registered
    recorder.notes.append(move_aliases(recorder.client, name, version, accuracy, failures))
