"""After `dvc repro`: complete the MLflow record of an execution in which DVC skipped evaluate.

On a fresh clone, `dvc repro` reruns ingest ... finetune (their outputs are DVC-cached, not in
git) and, since they come out byte-identical, rightly skips evaluate, whose outputs are
committed and up to date. Evaluate is where the final metrics reach the execution's parent run
and the fine-tuned model becomes a registry version, so the newcomer's first run would leave
MLflow without results and without a champion. `make pipeline` therefore runs this module after
`dvc repro`::

    python -m stages.core.tracking.complete

It never reruns a stage and writes no DVC output. For the newest parent run in the experiment,
when its evaluate was skipped (``cached.evaluate``) and the parent holds no final metrics, it
logs on the parent what evaluate would have: the metrics of ``metrics/evaluate.json`` (only
when the file is the one dvc.lock records, i.e. current), the evaluation report, figures and
dvc.lock. Then, when no registry version holds the model of the finetune run that produced
``models/finetuned``, it registers that model and decides its aliases with the gates
recomputed from those metrics, exactly as evaluate does. With tracking off it does nothing.
"""

from __future__ import annotations

import json
import time

from stages.core.common import layout
from stages.core.common.errors import TrackingError
from stages.core.common.params import Params
from stages.core.evaluation.gates import failed_gates
from stages.core.tracking.recorder import Recorder, numeric_metrics
from stages.core.tracking.registry import promote, register
from stages.core.tracking.store import describe_failure, tracking_uri

PARENT_ROLE = "tags.`pipeline.role` = 'parent'"
FINAL_METRIC = "finetuned.accuracy"  # logged on the parent by evaluate, among the final metrics


def newest_parent(client, experiment_id: str):
    """The most recently started parent run of the experiment (None when there is none)."""
    found = client.search_runs(
        [experiment_id], PARENT_ROLE, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return found[0] if found else None


def complete_execution(params: Params) -> list[str]:
    """Record a skipped evaluate on the newest execution's parent run and in the registry (see
    the module docstring); returns the lines that say what was recorded (empty: nothing to do)."""
    import mlflow

    from stages.core.common.digests import dvc_md5
    from stages.core.tracking.lineage import locked_outputs

    client = mlflow.MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return []
    parent = newest_parent(client, experiment.experiment_id)
    if parent is None:
        return []
    tags = parent.data.tags
    if (
        "run.evaluate" in tags
        or "cached.evaluate" not in tags
        or FINAL_METRIC in parent.data.metrics
    ):
        return []  # evaluate ran in this execution (it logged everything), or DVC never reached it
    metrics_path = layout.EVALUATE_METRICS
    locked = locked_outputs().get("evaluate", {}).get(metrics_path.as_posix())
    if not metrics_path.is_file() or locked != dvc_md5(metrics_path):
        return [f"{metrics_path} is not the one dvc.lock records: run `dvc repro` first"]
    metrics = json.loads(metrics_path.read_text())
    # MLflow (a models:/m-... model URI) resolves through the global URI, as in Recorder.open.
    mlflow.set_tracking_uri(tracking_uri())
    recorder = Recorder()
    recorder.client, recorder.experiment_id, recorder.stage = (
        client,
        experiment.experiment_id,
        "evaluate",
    )
    recorder.parent_id = recorder.run_id = parent.info.run_id
    recorder.log_metrics(numeric_metrics(metrics), None, int(time.time() * 1000))
    recorder.log_artifacts([str(layout.EVALUATION_REPORT), str(layout.FIGURES), "dvc.lock"], None)
    name = parent.info.run_name
    lines = [f"recorded evaluate's current results (DVC skipped it) on parent run {name}"]
    if not _registered(client, params.tracking.registered_model, recorder.producer("finetune")):
        register(
            recorder,
            str(layout.FINETUNED_MODEL),
            str(layout.split_path("target", "test")),
            params.tracking.registered_model,
        )
        model, version = recorder.registered
        # The version was not evaluated by an evaluate run of its own: name the run whose
        # outputs (metrics, report) it was recorded from.
        for key, value in (
            ("evaluate_run_id", tags["cached.evaluate"]),
            ("evaluated_from", metrics_path.as_posix()),
        ):
            client.set_model_version_tag(model, str(version), key, value)
        accuracy = float(metrics["finetuned"]["accuracy"])
        promote(recorder, accuracy, failed_gates(metrics, params.evaluate))
        lines += recorder.notes
    return lines


def _registered(client, name: str, finetune_run: str | None) -> bool:
    """Whether a version of registered model ``name`` holds the model of ``finetune_run``."""
    from mlflow.exceptions import MlflowException

    if finetune_run is None:
        return False
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return False
    return any(version.run_id == finetune_run for version in versions)


def main() -> None:
    from stages.core.common.params import load_params
    from stages.core.tracking.runs import tracking_enabled

    if not tracking_enabled():
        return
    params = load_params()
    try:
        lines = complete_execution(params)
    except Exception as exc:  # MLflow and its stores raise many types: one line, as in stages
        raise TrackingError(describe_failure(exc)) from None
    for line in lines:
        print(f"pipeline: {line}", flush=True)


if __name__ == "__main__":
    from stages.core.common.cli import run_as_script
    from stages.core.common.warm_start import run_stage_warm

    # The imports above are light (0.2 s; mlflow comes later): the warm server the stages
    # started, when it runs, takes this step over with mlflow imported.
    run_stage_warm()
    run_as_script("pipeline", main)
