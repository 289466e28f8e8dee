"""Where each stage reads and writes, relative to the repo root (DVC's working directory)."""

from pathlib import Path

# Downloads of http(s) sources, by checksum (gitignored, dvcignored).
SOURCE_CACHE = Path(".cache/sources")


RAW = Path("data/raw/dataset.parquet")


CLEAN = Path("data/clean/dataset.parquet")


REJECTED = Path("data/quarantine/rejected.parquet")


VALIDATION_REPORT = Path("reports/validation.json")


VALIDATION_HTML = Path("reports/validation.html")


SUITES = Path("data/suites")  # committed GX suites (validate.suite)


SPLITS = Path("data/splits")


# The validated pretraining corpus (data.corpus), written by the tokenize stage: corpus.parquet
# (column text), rejected.parquet (text, reason) and report.json; report.json alone without one.
CORPUS_DIR = Path("data/corpus")


CORPUS = CORPUS_DIR / "corpus.parquet"


CORPUS_REJECTED = CORPUS_DIR / "rejected.parquet"


CORPUS_REPORT = CORPUS_DIR / "report.json"


# The tokenizer trained by the tokenize stage (model.tokenizer), saved with save_pretrained,
# and tokenizer_info.json: what was trained on what, or why none was.
TOKENIZER_DIR = Path("models/tokenizer")


TOKENIZER_INFO = TOKENIZER_DIR / "tokenizer_info.json"


BASE_MODEL = Path("models/base")


FINETUNED_MODEL = Path("models/finetuned")


TRAIN_METRICS = Path("metrics/train.json")


FINETUNE_METRICS = Path("metrics/finetune.json")


EVALUATE_METRICS = Path("metrics/evaluate.json")


TRAIN_PLOT = Path("plots/train.csv")


FINETUNE_PLOT = Path("plots/finetune.csv")


CONFUSION_PLOT = Path("plots/confusion.csv")


ROC_PLOT = Path("plots/roc.csv")


PRECISION_RECALL_PLOT = Path("plots/precision_recall.csv")


PER_CLASS_PLOTS = Path("plots/per_class")  # <model>.csv: class, precision, recall, f1, support


EVALUATION_REPORT = Path("reports/evaluation.md")


FIGURES = Path("reports/figures")


DRIFT_REPORT = Path("reports/drift.json")


DRIFT_METRICS = Path("metrics/drift.json")


DRIFT_PLOT = Path("plots/drift.csv")


# Resume points of train and finetune: ignored by git and DVC, removed when a stage succeeds.
CHECKPOINTS = Path(".checkpoints")


def split_path(role: str, part: str) -> Path:
    """``data/splits/<role>_<part>.parquet``, e.g. ``base_train``."""
    return SPLITS / f"{role}_{part}.parquet"


def checkpoint_dir(stage: str) -> Path:
    """``.checkpoints/<stage>``: where a stage keeps the checkpoints it may resume from."""
    return CHECKPOINTS / stage


SAMPLES_REPORT = Path("reports/samples.md")  # a causal LM's sample continuations (train)
