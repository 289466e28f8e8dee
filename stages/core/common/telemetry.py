"""No phoning home: the switches that turn off DVC's, MLflow's, GX's and Hugging Face's
telemetry (peft loads huggingface_hub)."""

import os

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def silence() -> None:
    """Set the telemetry switches (unless the user set them); call before importing a library."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
