"""The MLflow side of one stage run (the Recorder), run in the worker process or inline."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.core.tracking.store import ensure_experiment, redact, tracking_uri

# MLflow caps one log_batch call at 1000 metrics.
MAX_METRICS_PER_CALL = 1000


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of ``metrics``, nested keys joined with '.'; text and flags dropped."""
    # numbers.Real covers numpy scalars too (pandas counts are np.int64).
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


# MLflow refuses a param value over 6000 characters (mlflow.utils.validation): a long
# id2label or list of target modules is shortened to this, never a crash.
PARAM_LIMIT = 6000


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} characters in all)"
    return text[: limit - len(tail)] + tail


def param_value(value: Any) -> str:
    """How a param reads in MLflow: ``null`` for None, else its text (lists as ``[128, 64]``),
    with the user-info part of any URI in it redacted (a ``data.source`` URL with a token),
    shortened to MLflow's length limit."""
    return "null" if value is None else shorten(redact(str(value)), PARAM_LIMIT)


class Recorder:
    """The MLflow side of one stage run. Runs in the worker process or inline; every public
    method is an operation a StageRun can send.

    Inside a DVC execution the stage run is the child of one parent run per execution (see
    stages.core.tracking.lineage.execution_key):
    the parent holds every param, the commit, the data md5s,
    the final metrics, and for each stage the run that produced its outputs (``run.<stage>``
    when it ran in this execution, ``cached.<stage>`` when DVC skipped it).
    """

    def __init__(self) -> None:
        self.client = None
        self.stage: str | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.fluent = False  # whether the run is also mlflow's active run (for log_model)
        self._git: tuple[str | None, bool] | None = None
        self.registered: tuple[str, int] | None = None  # the model version evaluate registered
        self.notes: list[str] = []  # lines for the stage to print when it ends

    def open(
        self,
        stage: str,
        experiment: str,
        params: dict[str, Any],
        resume_key: str | None = None,
        resuming: bool = False,
        pipeline_params: Mapping[str, Any] | None = None,
    ) -> None:
        """Start the stage's run and log its params; tagged ``resume.key`` with ``resume_key``.

        ``pipeline_params``: every param of the execution (params.yaml as the stage loaded
        it), which the execution's parent records when this stage is the first to run.

        ``resuming``: the stage resumes a checkpoint; the run it was logging to, the newest run
        of this stage with the same key, continues (a new run when the store has none).
        """
        import mlflow

        from stages.core.tracking.lineage import execution_key

        _quiet_mlflow()
        self.experiment_id = ensure_experiment(experiment)
        # MLflow resolves some URIs through its global tracking URI, not a client's (a logged
        # model's models:/m-... when a version is registered from it): make it this store, not
        # MLflow's default relative to the working directory (a queued experiment's copy).
        mlflow.set_tracking_uri(tracking_uri())
        self.client = mlflow.MlflowClient(tracking_uri())
        self.stage = stage
        key = execution_key()
        if key is not None:
            self.parent_id = self._parent(key, pipeline_params or {})
        if resuming and resume_key:
            self.run_id = self._resumable(resume_key)
        if self.run_id is not None:
            self._adopt_resumed_run()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"stage": stage, **self.context_tags()}
            if resume_key:
                tags["resume.key"] = resume_key
            if self.parent_id:
                tags["mlflow.parentRunId"] = self.parent_id
            run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(self.run_id, params)
        if self.parent_id:
            self._tag_parent_at_open()

    def _resumable(self, resume_key: str) -> str | None:
        """The newest run of this stage tagged with ``resume_key``."""
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.stage = '{self.stage}' and tags.`resume.key` = '{resume_key}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return found[0].info.run_id if found else None

    def _adopt_resumed_run(self) -> None:
        """The resumed run joins this execution's parent; the parent it had, that of the
        execution killed with it (its worker died too, so nothing ended it), ends as KILLED
        once its DVC process is gone, instead of staying RUNNING forever."""
        from stages.core.tracking.lineage import execution_alive

        earlier = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        if earlier is None or earlier == self.parent_id:
            return
        if self.parent_id:
            self.client.set_tag(self.run_id, "mlflow.parentRunId", self.parent_id)
        previous = self.client.get_run(earlier)
        key = previous.data.tags.get("pipeline.execution")
        if previous.info.status == "RUNNING" and not execution_alive(key):
            self.client.set_terminated(earlier, "KILLED")

    def context_tags(self) -> dict[str, str]:
        """The commit (a DVC experiment's baseline), whether the code or params differ from it,
        and the DVC experiment's name."""
        from stages.core.tracking.lineage import experiment_baseline, git_state, stage_outputs

        if self._git is None and self.parent_id:
            # One execution, one checkout: the parent recorded it when the first stage ran.
            parent = self.client.get_run(self.parent_id).data.tags
            if "git.dirty" in parent:
                self._git = (parent.get("git.commit"), parent["git.dirty"] == "true")
        if self._git is None:
            outputs = [p for s in _pipeline_stages() for p in stage_outputs(s)]
            self._git = git_state(outputs)
        commit, dirty = self._git
        commit = experiment_baseline() or commit
        tags = {"git.dirty": str(dirty).lower()}
        if commit:
            tags |= {"git.commit": commit, "mlflow.source.git.commit": commit}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        return tags

    def _parent(self, key: str, pipeline_params: Mapping[str, Any]) -> str:
        """This execution's parent run, created by its first stage with ``pipeline_params``."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`pipeline.execution` = '{key}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        tags = self.context_tags()
        name = f"{os.environ.get('DVC_EXP_NAME') or 'workspace'}@{tags.get('git.commit', '')[:7]}"
        tags |= {"pipeline.execution": key, "pipeline.role": "parent"}
        parent = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._log_params(parent.info.run_id, pipeline_params)
        if Path("params.yaml").is_file():
            self.client.log_artifact(parent.info.run_id, "params.yaml")
        return parent.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, param_value(v)) for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes 100 params per call
            self.client.log_batch(run_id, params=flat[start : start + 100])

    def _tag_parent_at_open(self) -> None:
        from stages.core.tracking.lineage import locked_data_inputs

        self.client.update_run(self.parent_id, status="RUNNING")
        self.client.set_tag(self.parent_id, f"run.{self.stage}", self.run_id)
        if f"cached.{self.stage}" in self.client.get_run(self.parent_id).data.tags:
            self.client.delete_tag(self.parent_id, f"cached.{self.stage}")
        # The data inputs as dvc.lock records them: current for every stage DVC has run
        # before this one in this execution.
        for path, md5 in locked_data_inputs().items():
            self.client.set_tag(self.parent_id, f"dvc.md5.{path}", md5)

    def current_run_id(self) -> str:
        return self.run_id

    def log_metrics(
        self, metrics: dict[str, float], step: int | None, timestamp: int, parent: bool = False
    ) -> None:
        self.log_metric_batches([(metrics, step, timestamp)])
        if parent and self.parent_id:
            self._log_metric_rows(self.parent_id, [(metrics, step, timestamp)])

    def log_metric_batches(self, batches: list[tuple[dict[str, float], int | None, int]]) -> None:
        """Log ``(metrics, step, timestamp_ms)`` batches in as few calls as MLflow allows."""
        self._log_metric_rows(self.run_id, batches)

    def _log_metric_rows(self, run_id: str, batches) -> None:
        from mlflow.entities import Metric

        rows = [
            Metric(key, value, timestamp, step or 0)
            for metrics, step, timestamp in batches
            for key, value in metrics.items()
        ]
        for start in range(0, len(rows), MAX_METRICS_PER_CALL):
            self.client.log_batch(run_id, metrics=rows[start : start + MAX_METRICS_PER_CALL])

    def log_artifacts(self, paths: list[str], folder: str | None, parent: bool = False) -> None:
        run_ids = [self.run_id] + ([self.parent_id] if parent and self.parent_id else [])
        for run_id in run_ids:
            for path in map(Path, paths):
                if path.is_dir():
                    self.client.log_artifacts(run_id, str(path), folder or path.name)
                elif path.exists():
                    self.client.log_artifact(run_id, str(path), folder)

    def log_dataset(self, path: str, context: str, name: str) -> None:
        """Record a parquet split the stage read as a dataset input, with DVC's md5 as its
        digest (MLflow's own digest hashes only the first 10,000 rows)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        from stages.core.common.digests import dvc_md5

        frame = pd.read_parquet(path)
        with warnings.catch_warnings():
            # MLflow hints that integer labels cannot hold missing values (ours never do),
            # and that a local path could be one of two kinds of source (it is a file).
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                frame, source=path, name=name, targets="label", digest=dvc_md5(path)
            )._to_mlflow_entity()
        dataset_input = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(self.run_id, datasets=[dataset_input])

    def run_operation(self, operation, *args: Any) -> Any:
        """Run ``operation(self, *args)``: a module-level function of another core module (such
        as stages.core.tracking.registry), which the stage names and this process imports."""
        return operation(self, *args)

    def activate(self) -> None:
        """Make the stage's run mlflow's active run, for APIs that log to the active run."""
        import mlflow

        if not self.fluent:
            mlflow.start_run(run_id=self.run_id)
            self.fluent = True

    def parent_tags(self) -> dict[str, str]:
        """The parent run's tags (empty outside a DVC execution)."""
        return self.client.get_run(self.parent_id).data.tags if self.parent_id else {}

    def close(self, status: str) -> tuple[str | None, list[str]]:
        """End the run with ``status``; record its outputs' md5s and, on the parent, which
        run produced each stage's outputs. Returns the run id and the notes for the stage."""
        if self.run_id is None:
            return None, self.notes
        if status == "FINISHED":
            self._tag_outputs()
        if self.parent_id:
            self._tag_lineage()
            self.client.set_terminated(self.parent_id, status)
        if self.fluent:
            import mlflow

            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.run_id, status)
        return self.run_id, self.notes

    def _tag_outputs(self) -> None:
        from stages.core.common.digests import dvc_md5
        from stages.core.tracking.lineage import stage_outputs

        for path in stage_outputs(self.stage):
            if Path(path).exists():
                self.client.set_tag(self.run_id, f"dvc.out.{path}", dvc_md5(path))

    def _tag_lineage(self) -> None:
        """For each stage DVC did not run in this execution, the earlier run that produced the
        outputs dvc.lock records for it, found by their md5 (``cached.<stage>``)."""
        from stages.core.tracking.lineage import locked_outputs

        tags = self.client.get_run(self.parent_id).data.tags
        for stage, outputs in locked_outputs().items():
            if f"run.{stage}" in tags or not outputs:
                continue
            producer = self._run_with_outputs(stage, outputs) or "unknown"
            self.client.set_tag(self.parent_id, f"cached.{stage}", producer)

    def producer(self, stage: str) -> str | None:
        """The run that produced ``stage``'s outputs now on disk: its run in this execution,
        else the newest finished run that recorded the same md5 (None when the store has none,
        e.g. the stage ran with tracking off)."""
        from stages.core.common.digests import dvc_md5
        from stages.core.tracking.lineage import stage_outputs

        ran = self.parent_tags().get(f"run.{stage}")
        if ran:
            return ran
        path = next((p for p in stage_outputs(stage) if Path(p).exists()), None)
        return self._run_with_outputs(stage, {path: dvc_md5(path)}) if path else None

    def _run_with_outputs(self, stage: str, outputs: dict[str, str]) -> str | None:
        path, md5 = next(iter(outputs.items()))
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.stage = '{stage}' and tags.`dvc.out.{path}` = '{md5}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return found[0].info.run_id if found else None


def _quiet_mlflow() -> None:
    """MLflow's info lines and hints are not for a pipeline's log; its warnings stay."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _pipeline_stages() -> list[str]:
    from stages.core.tracking.lineage import pipeline_stages

    return pipeline_stages()
