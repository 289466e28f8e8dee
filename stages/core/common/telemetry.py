"""No phoning home: the switches that turn off DVC's, MLflow's, GX's and Hugging Face's
telemetry (peft loads huggingface_hub); and the MLflow settings every tracked stage defaults
(the warm server keys its forks on the environment with all of them applied)."""

import os

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

# A tracking server that is down or silent stops a stage in about 12 s, not MLflow's default of
# several minutes of retries: one retry, a 6 s timeout per attempt (users may override both).
# And no progress bars from artifact copies in the stage's log.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "6",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def silence() -> None:
    """Set the telemetry switches (unless the user set them); call before importing a library."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
