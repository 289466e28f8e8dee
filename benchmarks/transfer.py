"""How well each architecture and fine-tune strategy transfers to the target domain.

Trains the base model of each arch on the base splits (data/splits/, from `dvc repro split`),
then, for each strategy, fine-tunes and trains from scratch on the same shots over
``evaluate.draws`` draws, exactly as the evaluate stage does. Prints a Markdown table and, last,
one line of JSON. Params come from params.yaml, with overrides:

    .venv/bin/python -m benchmarks.transfer --arch mlp transformer --strategy head full lora \\
        --set finetune.lr=0.003 --set train.epochs=100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from stages.core.common import layout
from stages.core.common.params import PARAMS_FILE, Params, parse_params
from stages.core.data.splitting import PARTS
from stages.core.engine.training import fit, fit_options
from stages.core.evaluation.baselines import compare_on_draws, draw_accuracies, summarize_draws
from stages.core.evaluation.metrics import scores
from stages.core.evaluation.scoring import predictions
from stages.core.modeling.finetuning import fine_tune, sample_shots
from stages.core.modeling.model import Classifier, base_config, encode


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (YAML values) applied to the raw params mapping."""
    for item in overrides:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return raw


def train_base(params: Params, splits: dict[str, pd.DataFrame]):
    config = base_config(splits["base_train"], params.model, params.data)
    torch.manual_seed(params.train.seed)
    model = Classifier(config)
    options = fit_options(params.section("train"))
    fit(model, encode(splits["base_train"], config), encode(splits["base_val"], config), options)
    return model, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--strategy", nargs="+", default=["head", "full", "lora"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw = with_overrides(yaml.safe_load(Path(PARAMS_FILE).read_text()), args.set)
    splits = {
        f"{role}_{part}": pd.read_parquet(layout.split_path(role, part))
        for role in ("base", "target")
        for part in PARTS
    }
    target = {part: splits[f"target_{part}"] for part in PARTS}
    results = []
    print("| arch | strategy | base | zero-shot | fine-tuned (mean) | scratch (mean) | gain | "
          "worst gain | trainable | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        first = f"finetune.strategy={args.strategy[0]}"  # some finetune keys need a strategy
        arch_raw = with_overrides(json.loads(json.dumps(raw)), [f"model.arch={arch}", first])
        started = time.perf_counter()
        params = parse_params(arch_raw)
        base, config = train_base(params, splits)
        base_accuracy = scores(predictions(base, config, splits["base_test"]))["accuracy"]
        zero_shot = scores(predictions(base, config, target["test"]))["accuracy"]
        for strategy in args.strategy:
            params = parse_params(with_overrides(arch_raw, [f"finetune.strategy={strategy}"]))
            seed = params.finetune.seed
            shots = sample_shots(target["train"], params.finetune.shots_per_class, seed)
            shipped = fine_tune(base, config, shots, target["val"], params, seed)
            draws = compare_on_draws(base, config, shipped[:2], target, params)
            summary = summarize_draws(
                draw_accuracies(draws, "finetuned"), draw_accuracies(draws, "scratch")
            )
            seconds = time.perf_counter() - started
            row = {
                "arch": arch,
                "strategy": strategy,
                "base": base_accuracy,
                "zero_shot": zero_shot,
                "trainable_parameters": shipped[2].trainable_parameters,
                "seconds": round(seconds, 1),
                **summary,
            }
            results.append(row)
            print(
                f"| {arch} | {strategy} | {base_accuracy:.3f} | {zero_shot:.3f} | "
                f"{summary['finetuned_mean']:.3f} | {summary['scratch_mean']:.3f} | "
                f"{summary['gain_mean']:+.3f} | {summary['gain_min']:+.3f} | "
                f"{row['trainable_parameters']:,} | {seconds:.0f} |",
                flush=True,
            )
            started = time.perf_counter()
    print(json.dumps({"overrides": args.set, "results": results}))


if __name__ == "__main__":
    main()
