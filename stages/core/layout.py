"""Where each stage reads and writes, relative to the repo root (DVC's working directory)."""

from pathlib import Path

RAW = Path("data/raw/dataset.parquet")
CLEAN = Path("data/clean/dataset.parquet")
REJECTED = Path("data/quarantine/rejected.parquet")
VALIDATION_REPORT = Path("reports/validation.json")
SPLITS = Path("data/splits")
BASE_MODEL = Path("models/base")
FINETUNED_MODEL = Path("models/finetuned")
TRAIN_METRICS = Path("metrics/train.json")
FINETUNE_METRICS = Path("metrics/finetune.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
TRAIN_PLOT = Path("plots/train.csv")
FINETUNE_PLOT = Path("plots/finetune.csv")
CONFUSION_PLOT = Path("plots/confusion.csv")
EVALUATION_REPORT = Path("reports/evaluation.md")
# Resume points of train and finetune: ignored by git and DVC, removed when a stage succeeds.
CHECKPOINTS = Path(".checkpoints")


def split_path(role: str, part: str) -> Path:
    """``data/splits/<role>_<part>.parquet``, e.g. ``base_train``."""
    return SPLITS / f"{role}_{part}.parquet"


def checkpoint_dir(stage: str) -> Path:
    """``.checkpoints/<stage>``: where a stage keeps the checkpoints it may resume from."""
    return CHECKPOINTS / stage
