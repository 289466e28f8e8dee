"""The pretraining demo's data and table (docs/pretraining-demo.md).

Debian's `fortunes` package (Debian main, DFSG-free; `apt-get install fortunes`) ships files of
quotations, one file per category under /usr/share/games/fortunes/, each quotation ended by a
line holding only `%`. This script writes, from the installed package (the text itself is never
committed):

- `data/source/fortunes.csv`: the labelled task, columns `text` and `category`, at most
  `--per-class` quotations of each of `CATEGORIES` (the first ones of each file, in file order);
- `data/source/fortunes_corpus.csv`: the unlabelled pretraining corpus, column `text`, every
  quotation of every category (the `off/` folder skipped), in sorted file order.

Both are deterministic: the same package gives the same bytes. A text that stands under two of
the chosen categories is left out of the labelled set (its label would be ambiguous).

    .venv/bin/python scripts/fortunes_demo.py prepare
    .venv/bin/python scripts/fortunes_demo.py table --setting "mlm, 16 shots"
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "food", "love", "politics", "science", "sports")
PER_CLASS = 200
# Backspace overstrike ("_\bX" underlines X): keep the printed character only.
OVERSTRIKE = re.compile(r".\x08")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class MissingFortunes(Exception):
    """The fortunes package is not installed where the script looks."""


def parse_fortunes(text: str) -> list[str]:
    """The quotations of one fortune file: the pieces between lines holding only `%`, each with
    overstrikes and control characters removed (tabs and newlines kept) and surrounding
    whitespace stripped; empty pieces dropped."""
    pieces, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            pieces.append("\n".join(current))
            current = []
        else:
            current.append(line)
    pieces.append("\n".join(current))
    cleaned = (CONTROL.sub("", OVERSTRIKE.sub("", piece)).strip() for piece in pieces)
    return [piece for piece in cleaned if piece]


def category_files(folder: Path) -> dict[str, Path]:
    """Category name -> its file in ``folder``: the UTF-8 `.u8` version where there is one,
    else the plain file; `.dat` indexes, hidden files and subfolders (`off/`) skipped."""
    if not folder.is_dir():
        raise MissingFortunes(
            f"{folder} not found: install Debian's fortunes package (apt-get install fortunes)"
        )
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix == ".dat":
            continue
        name = path.name.removesuffix(".u8")
        if path.name.endswith(".u8") or name not in files:
            files[name] = path
    if not files:
        raise MissingFortunes(f"{folder} holds no fortune files: apt-get install fortunes")
    return files


def read_category(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return parse_fortunes(text)


def build(
    folder: Path, categories: tuple[str, ...] = CATEGORIES, per_class: int = PER_CLASS
) -> tuple[list[tuple[str, str]], list[str]]:
    """The labelled rows (text, category) and the corpus texts, from the fortune files in
    ``folder``."""
    files = category_files(folder)
    missing = [name for name in categories if name not in files]
    if missing:
        raise MissingFortunes(f"{folder} lacks the categories {missing}: apt-get install fortunes")
    texts = {name: read_category(path) for name, path in files.items()}
    owners = Counter(text for name in categories for text in set(texts[name]))
    rows: list[tuple[str, str]] = []
    for name in categories:
        seen: set[str] = set()
        kept = []
        for text in texts[name]:
            if owners[text] == 1 and text not in seen:
                seen.add(text)
                kept.append(text)
        rows += [(text, name) for text in kept[:per_class]]
    corpus = [text for name in sorted(texts) for text in texts[name]]
    return rows, corpus


def write_csv(path: Path, header: list[str], rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def prepare(folder: Path, out: Path, per_class: int) -> str:
    rows, corpus = build(folder, per_class=per_class)
    write_csv(out / "fortunes.csv", ["text", "category"], rows)
    write_csv(out / "fortunes_corpus.csv", ["text"], [[text] for text in corpus])
    counts = Counter(label for _, label in rows)
    shown = ", ".join(f"{name} {counts[name]}" for name in CATEGORIES)
    return (
        f"{out / 'fortunes.csv'}: {len(rows)} rows ({shown}); "
        f"{out / 'fortunes_corpus.csv'}: {len(corpus)} texts"
    )


# The demo's params over the default params.yaml (`params` writes them): BERT-style masked-LM
# pretraining from scratch on the whole corpus, then full fine-tuning on a few shots per class.
DEMO_PARAMS: dict = {
    "data": {
        "source": "data/source/fortunes.csv",
        "label": "category",
        "features": None,
        "image_shape": None,
        "text_column": "text",
        "corpus": "data/source/fortunes_corpus.csv",
        "corpus_column": "text",
    },
    "validate": {"feature_range": None},
    "model": {
        "arch": "hf",
        "pretrained": None,
        "max_length": 128,
        "hf": {
            "model_type": "bert",
            "hidden_size": 128,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 256,
            "max_positions": 128,
        },
        "tokenizer": {"kind": "wordpiece", "vocab_size": 8000},
    },
    "train": {
        "objective": "mlm",
        "block_size": 64,
        "pack": True,
        "epochs": 4,
        "batch_size": 64,
        "lr": 0.001,
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_epochs": 0.5,
        "patience": None,
        "cpu_threads": 1,
        "checkpoint_every": None,
    },
    "finetune": {
        "shots_per_class": 16,
        "strategy": "full",
        "epochs": 30,
        "batch_size": 32,
        "lr": 0.0005,
        "checkpoint_every": None,
    },
    "evaluate": {
        "draws": 5,
        "min_transfer_gain": -1.0,
        "bootstrap_resamples": 1000,
    },
    "tracking": {"registered_model": "fortunes-classifier"},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and key in base else value
    return out


def demo_params(base: dict, overrides: list[str], corpus: bool = True) -> dict:
    """``base`` (params.yaml) with DEMO_PARAMS and ``overrides`` (`key.sub=value`, the value
    read as YAML) over it; ``corpus`` False leaves out the data.corpus keys (a checkout
    without the tokenize stage)."""
    import yaml

    over = json.loads(json.dumps(DEMO_PARAMS))
    if not corpus:
        for key in ("corpus", "corpus_column"):
            over["data"].pop(key)
        over["model"].pop("tokenizer")
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = over
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return merge(base, over)


TABLE_HEADER = (
    "| setting | fine-tuned, mean of draws | scratch, mean of draws | gain [95% t-interval] "
    "| worst draw | fine-tuned, draw 1 [95% bootstrap] | scratch, draw 1 | TF-IDF "
    "| val perplexity, epoch 1 -> kept | held out |\n|" + "---|" * 10
)


def _ci(block: dict) -> str:
    """`accuracy [low, high]` of an evaluate.json block (the bootstrap interval)."""
    low, high = block.get("accuracy_ci95_low"), block.get("accuracy_ci95_high")
    if low is None or high is None:
        return f"{block['accuracy']:.3f}"
    return f"{block['accuracy']:.3f} [{low:.3f}, {high:.3f}]"


def table(metrics: Path, plots: Path, setting: str) -> str:
    """The demo table's row from metrics/evaluate.json, metrics/train.json and the first
    epoch of plots/train.csv."""
    evaluate = json.loads((metrics / "evaluate.json").read_text())
    train = json.loads((metrics / "train.json").read_text())
    with (plots / "train.csv").open(newline="") as handle:
        first = next(csv.DictReader(handle))
    gain = evaluate["transfer"]
    cells = [
        setting,
        f"{gain['finetuned_mean']:.3f}",
        f"{gain['scratch_mean']:.3f}",
        f"{gain['gain_mean']:+.3f} [{gain['gain_ci95_low']:+.3f}, {gain['gain_ci95_high']:+.3f}]",
        f"{gain['gain_min']:+.3f}",
        _ci(evaluate["finetuned"]),
        _ci(evaluate["scratch"]),
        _ci(evaluate["sklearn"]),
        f"{float(first['val_perplexity']):.0f} -> {train['val_perplexity']:.0f}",
        f"{train['texts']['held_out']}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write data/source/fortunes.csv and the corpus")
    prep.add_argument("--fortunes", type=Path, default=FORTUNES, help="the fortune files")
    prep.add_argument("--out", type=Path, default=ROOT / "data" / "source")
    prep.add_argument("--per-class", type=int, default=PER_CLASS)
    par = sub.add_parser("params", help="write the demo's params into params.yaml")
    par.add_argument("overrides", nargs="*", help="key.sub=value over the demo's params")
    par.add_argument("--no-corpus", action="store_true", help="without data.corpus")
    tab = sub.add_parser("table", help="print the demo table's row from metrics/")
    tab.add_argument("--metrics", type=Path, default=ROOT / "metrics")
    tab.add_argument("--plots", type=Path, default=ROOT / "plots")
    tab.add_argument("--setting", default="this run")
    tab.add_argument("--header", action="store_true", help="print the table's header first")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(args.fortunes, args.out, args.per_class))
        elif args.command == "params":
            import yaml

            path = ROOT / "params.yaml"
            params = demo_params(
                yaml.safe_load(path.read_text()), args.overrides, not args.no_corpus
            )
            path.write_text(yaml.safe_dump(params, sort_keys=False))
            print(f"{path}: the demo's params (git checkout params.yaml restores the default)")
        else:
            if args.header:
                print(TABLE_HEADER)
            print(table(args.metrics, args.plots, args.setting))
    except (MissingFortunes, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
