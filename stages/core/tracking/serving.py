"""The pipeline's models as MLflow pyfunc models: loadable with ``mlflow.pyfunc.load_model``,
servable with ``mlflow models serve``.

Logged as a model from code (this file), with the model directory (``model.safetensors`` +
``config.json``) as its artifact and the ``stages`` package as its code: loading unpickles
nothing. ``predict`` takes a DataFrame of the raw feature columns, any number of rows, and returns
the class labels (the model applies its own scaling); with ``params={"probabilities": True}`` it
returns one column of probabilities per class instead.

A text model (``model.arch: hf``: a Hugging Face checkpoint with its tokenizer and
``TEXT_META``) takes a DataFrame with its text column, or a list of strings, and answers the
same way; its signature has one string input (unnamed, so that a list passes MLflow's schema
check)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

ARTIFACT = "model"  # the key of the model directory among the pyfunc's artifacts
# A text model saved as a LoRA adapter only (finetune.lora.save: adapter): the base checkpoint
# it goes on, logged beside it so that the logged model is whole.
ADAPTER_BASE = "adapter_base"
# stages.core.modeling.text.TEXT_META, not imported from there: that module imports torch, and
# this one is imported by the tracking worker, which never needs it.
TEXT_META = "pipeline.json"


# What loading the model imports, pinned to this environment's versions.
REQUIREMENTS = ("mlflow", "torch", "safetensors", "numpy", "pandas", "pydantic", "pyyaml")
TEXT_REQUIREMENTS = ("transformers", "tokenizers")


def model_config(model_dir: Path | str) -> dict[str, Any]:
    """The metadata of a saved model directory: a text model's ``TEXT_META`` (with
    ``"text": True``), else the feature model's ``config.json``."""
    import json

    text_meta = Path(model_dir) / TEXT_META
    if text_meta.is_file():
        return json.loads(text_meta.read_text()) | {"text": True}
    return json.loads((Path(model_dir) / "config.json").read_text())


class PipelineModel(mlflow.pyfunc.PythonModel):
    """A saved pipeline model (`models/base`, `models/finetuned`) behind the pyfunc API."""

    def load_context(self, context) -> None:
        directory = context.artifacts[ARTIFACT]
        self.tokenizer = None
        if (Path(directory) / TEXT_META).is_file():
            from stages.core.modeling.text import load_text_model

            base = context.artifacts.get(ADAPTER_BASE)
            self.model, self.tokenizer, self.config = load_text_model(directory, base=base)
            return
        from stages.core.modeling.model import load_model

        self.model, self.config = load_model(directory)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame | pd.Series:
        import numpy as np
        import torch

        if self.tokenizer is not None:
            return self._predict_texts(model_input, params)
        missing = [c for c in self.config.feature_names if c not in model_input.columns]
        if missing:
            raise ValueError(f"missing feature columns {missing[:5]} ({len(missing)} in all)")
        x = torch.tensor(model_input[self.config.feature_names].to_numpy(np.float32))
        self.model.eval()
        with torch.no_grad():
            probabilities = torch.softmax(self.model(x), dim=1).numpy()
        if (params or {}).get("probabilities"):
            columns = [str(label) for label in self.config.classes]
            return pd.DataFrame(probabilities, columns=columns, index=model_input.index)
        classes = np.asarray(self.config.classes)
        # The input's index, as for the probabilities: `rows.assign(pred=model.predict(rows))`
        # on a filtered frame aligns each label with its row.
        labels = classes[probabilities.argmax(axis=1)]
        return pd.Series(labels, name="label", index=model_input.index)

    def _predict_texts(self, model_input, params: dict[str, Any] | None):
        import numpy as np

        from stages.core.modeling.text import predict_texts

        column = self.config.text_column
        if not isinstance(model_input, pd.DataFrame):  # a list (or Series) of strings
            model_input = pd.DataFrame({column: list(model_input)})
        if column not in model_input.columns:
            if len(model_input.columns) != 1:
                raise ValueError(f"missing the text column {column!r}")
            column = model_input.columns[0]  # one unnamed column: the texts
        texts = ["" if t is None else str(t) for t in model_input[column].tolist()]
        probabilities = predict_texts(
            self.model, self.tokenizer, texts, self.config.max_length
        ).numpy()
        if (params or {}).get("probabilities"):
            columns = [str(label) for label in self.config.classes]
            return pd.DataFrame(probabilities, columns=columns, index=model_input.index)
        classes = np.asarray(self.config.classes)
        labels = classes[probabilities.argmax(axis=1)] if len(texts) else classes[:0]
        return pd.Series(labels, name="label", index=model_input.index)


def requirements(text: bool = False, adapter: bool = False) -> list[str]:
    """Explicit pip requirements (inferring them costs 5-10 s a model); a text model's add
    transformers and tokenizers, and peft for one saved as an adapter only."""
    pins = []
    for name in REQUIREMENTS + (TEXT_REQUIREMENTS if text else ()) + (("peft",) if adapter else ()):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def signature(config: dict[str, Any]):
    """Inputs: the raw feature columns as doubles (a text model: its text column, a string);
    output: the label; param: probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    label_type = "string" if any(isinstance(c, str) for c in config["classes"]) else "long"
    if config.get("text"):
        # One unnamed string column: MLflow then takes a list of strings as well as a DataFrame
        # (its column named as the text column, or any one column); a named column would make
        # it refuse the list.
        inputs = Schema([ColSpec("string")])
    else:
        inputs = Schema([ColSpec("double", name) for name in config["feature_names"]])
    return ModelSignature(
        inputs=inputs,
        outputs=Schema([ColSpec(label_type, "label")]),
        params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
    )


def log_pyfunc(model_dir: Path | str, input_example, name: str = "model"):
    """Log ``model_dir`` as a pyfunc model to the active run; returns MLflow's ModelInfo.

    What ``mlflow.pyfunc.log_model`` does, less one step: loading the model back to predict the
    input example. That check would import torch in the tracking worker, about 1.5 s on every
    train and finetune; tests/test_registry.py and the MLflow end-to-end tests load and predict
    with these models instead.
    """
    from types import SimpleNamespace

    from mlflow.models import Model

    config = model_config(model_dir)
    artifacts = {ARTIFACT: str(model_dir)}
    adapter_only = bool(config.get("adapter")) and not config.get("weights_sha256")
    if adapter_only:
        artifacts[ADAPTER_BASE] = config["adapter"]["base"]
    # Model.log saves through its flavor's save_model and skips the serving check when told.
    pyfunc = SimpleNamespace(__name__=mlflow.pyfunc.__name__, save_model=_save_pyfunc)
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=pyfunc,
        python_model=Path(__file__),
        artifacts=artifacts,
        code_paths=[str(Path(__file__).resolve().parents[2])],
        signature=signature(config),
        input_example=input_example,
        pip_requirements=requirements(bool(config.get("text")), adapter_only),
        validate_serving_input=False,
    )


def _save_pyfunc(validate_serving_input: bool = True, **kwargs):
    return mlflow.pyfunc.save_model(**kwargs)


# The module each of our requirements is imported as, where it differs from its name.
REQUIREMENT_MODULES = {"pyyaml": "yaml"}


def prepare() -> None:
    """Give MLflow its map of modules to distributions for our models' requirements alone.

    Whenever MLflow logs or loads a model, it checks the model's pip requirements against this
    environment, and first maps every installed module to its distribution
    (``importlib_metadata.packages_distributions``): 0.7-0.8 s of CPU here, in every tracking
    worker that logs or loads a model. It reads that map only to find a module to import when a
    distribution's metadata is missing, and to infer requirements. Ours are explicit (see
    ``requirements``) and all installed distributions, so the map of those alone gives the same
    check. Only processes that log nothing but our models call this (the tracking worker).
    """
    from mlflow.utils import requirements_utils

    if requirements_utils._MODULES_TO_PACKAGES is not None:
        return  # already built, whole or ours
    names = REQUIREMENTS + TEXT_REQUIREMENTS + ("peft",)
    modules = {REQUIREMENT_MODULES.get(name, name): [name] for name in names}
    modules |= requirements_utils.MLFLOW_MODULES_TO_PACKAGES
    requirements_utils._MODULES_TO_PACKAGES = modules


set_model(PipelineModel())
