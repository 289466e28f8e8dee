"""reports/evaluation.md: the evaluation in words, tables and pictures, for reading on GitHub."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from stages.core.common.params import Params
from stages.core.evaluation.gates import Gate

WORST_CLASSES_SHOWN = 3


def _number(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def _with_interval(block: Mapping, name: str) -> str:
    if name not in block:
        return "n/a"
    low, high = block.get(f"{name}_ci95_low"), block.get(f"{name}_ci95_high")
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{block[name]:.3f}{interval}"


def _scratch_is_trained_like_finetuning(params: Params) -> bool:
    """``evaluate.scratch_strategy: same``: the scratch control trains ``finetune.strategy``
    (with ``head``, a head on the random body), not every layer."""
    return params.evaluate.scratch_strategy == "same"


def _models_table(
    metrics: Mapping, shots: int | str, params: Params, text: bool = False
) -> list[str]:
    classical = "TF-IDF + logistic regression" if text else "logistic regression"
    scratch = f"same net from scratch on the {shots} shots"
    if _scratch_is_trained_like_finetuning(params):
        scratch = f"same net from random weights, {params.finetune.strategy} on the {shots} shots"
    rows = [
        ("base", "base model", "base-domain test"),
        ("zero_shot", "base model, no adaptation", "target-domain test"),
        ("finetuned", f"fine-tuned on {shots} shots/class", "target-domain test"),
        ("scratch", scratch, "target-domain test"),
        ("sklearn", f"{classical} on the same shots", "target-domain test"),
        (
            "checkpoint",
            "the checkpoint before pretraining here, fine-tuned on the same shots",
            "target-domain test",
        ),
    ]
    lines = [
        "| model | trained as | scored on | accuracy [95% CI] | recall, macro [95% CI] "
        "| F1, macro [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for key, what, where in rows:
        if key == "checkpoint" and key not in metrics:
            continue  # only domain-adaptive pretraining has this control
        block = metrics.get(key, {})
        cells = [_with_interval(block, name) for name in ("accuracy", "recall_macro", "f1_macro")]
        lines.append(f"| {key} | {what} | {where} | {' | '.join(cells)} |")
    return lines


def _uncertainty_sentence(metrics: Mapping, params: Params) -> str:
    tuned = metrics["finetuned"]
    half = (tuned["accuracy_ci95_high"] - tuned["accuracy_ci95_low"]) / 2
    return (
        f"Intervals are percentile bootstraps over the test rows "
        f"({params.evaluate.bootstrap_resamples} resamples, seed "
        f"{params.evaluate.bootstrap_seed}). With {tuned['support']} test rows, one accuracy "
        f"figure is uncertain by about ±{half:.3f} at 95% (half the width of the fine-tuned "
        f"model's interval, {tuned['accuracy_ci95_low']:.3f} to "
        f"{tuned['accuracy_ci95_high']:.3f}; about ±{half / 1.96:.3f} is one standard error), "
        f"so differences of that size between two models on this test set can be noise."
    )


def _transfer_lines(metrics: Mapping, params: Params) -> list[str]:
    transfer = metrics["transfer"]
    first = params.finetune.seed
    last = first + transfer["draws"] - 1
    seeds = f"seed {first}" if last == first else f"seeds {first}-{last}"
    if transfer["gain_ci95_low"] is None:
        interval = "no interval with a single draw"
    else:
        interval = (
            f"95% t-interval {_number(transfer['gain_ci95_low'], True)} to "
            f"{_number(transfer['gain_ci95_high'], True)}"
        )
    verb = "beats" if transfer["gain_mean"] >= 0 else "trails"
    control = "the same network trained from scratch"
    if _scratch_is_trained_like_finetuning(params):
        control = (
            f"the same network from random weights, trained as the fine-tuning is "
            f"({params.finetune.strategy}),"
        )
    return [
        f"Fine-tuning {verb} {control} on the same shots by "
        f"**{_number(transfer['gain_mean'], True)}** accuracy, averaged over "
        f"{transfer['draws']} draws of the shots ({seeds}; {interval}; "
        f"worst draw {_number(transfer['gain_min'], True)}).",
        "",
        "| shots | fine-tuned | scratch | gain |",
        "|---|---|---|---|",
        f"| shipped draw (seed {first}) | {_number(metrics['finetuned']['accuracy'])} "
        f"| {_number(metrics['scratch']['accuracy'])} "
        f"| {_number(metrics['transfer_gain'], True)} |",
        f"| mean over {transfer['draws']} draws | {_number(transfer['finetuned_mean'])} "
        f"| {_number(transfer['scratch_mean'])} | {_number(transfer['gain_mean'], True)} |",
    ]


def _versus_lines(metrics: Mapping, key: str, baseline: str, lead: str) -> list[str]:
    """One sentence on ``metrics[key]``, a :func:`summarize_draws` summary of the fine-tuned
    model's gain over ``baseline`` (its ``{baseline}_mean``) on the same draws; none without
    it. ``lead`` is the sentence's subject and verb, with ``{verb}`` for beats or trails."""
    if key not in metrics:
        return []
    summary = metrics[key]
    interval = (
        "no interval with a single draw"
        if summary["gain_ci95_low"] is None
        else f"95% t-interval {_number(summary['gain_ci95_low'], True)} to "
        f"{_number(summary['gain_ci95_high'], True)}"
    )
    verb = "beats" if summary["gain_mean"] >= 0 else "trails"
    return [
        "",
        f"{lead.format(verb=verb)} by **{_number(summary['gain_mean'], True)}** accuracy, "
        f"averaged over {summary['draws']} draws of the same shots ({interval}; worst draw "
        f"{_number(summary['gain_min'], True)}; means {_number(summary['finetuned_mean'])} "
        f"against {_number(summary[f'{baseline}_mean'])}).",
    ]


def _sklearn_lines(metrics: Mapping) -> list[str]:
    """The fine-tuned model against scikit-learn's baseline, over the draws."""
    lead = (
        "The fine-tuned model {verb} scikit-learn's logistic regression (`sklearn`) fitted on "
        "the same shots"
    )
    return _versus_lines(metrics, "versus_sklearn", "sklearn", lead)


def _adaptive_lines(metrics: Mapping) -> list[str]:
    """Whether this run's pretraining of a downloaded checkpoint helped the task, over the
    draws (none without ``adaptive_pretraining``)."""
    lead = (
        "Pretraining the checkpoint on this corpus first {verb} fine-tuning the checkpoint as "
        "it was"
    )
    return _versus_lines(metrics, "adaptive_pretraining", "checkpoint", lead)


def _confidence_lines(metrics: Mapping) -> list[str]:
    lines = [
        "| model | ROC AUC (one-vs-rest) | log loss | ECE (15 bins) |",
        "|---|---|---|---|",
    ]
    for key in ("base", "finetuned"):
        if key not in metrics:
            continue
        block = metrics[key]
        lines.append(
            f"| {key} | {_number(block['roc_auc_ovr'])} | {_number(block['log_loss'])} "
            f"| {_number(block['ece'])} |"
        )
    return lines


def _worst_class_lines(metrics: Mapping) -> list[str]:
    lines = [
        "| model | class | recall | precision | F1 | test rows |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("finetuned", "base"):
        if key not in metrics:
            continue
        present = [(c, row) for c, row in metrics[key]["per_class"].items() if row["support"]]
        worst = sorted(present, key=lambda item: item[1]["recall"])[:WORST_CLASSES_SHOWN]
        for label, row in worst:
            lines.append(
                f"| {key} | {label} | {row['recall']:.3f} | {row['precision']:.3f} "
                f"| {row['f1']:.3f} | {row['support']} |"
            )
    return lines


def _mistake_lines(mistakes: Sequence[Mapping]) -> list[str]:
    lines = ["## Most confident mistakes", ""]
    if not mistakes:
        return lines + ["No test text was misclassified.", ""]
    lines += ["| text | true label | predicted | confidence |", "|---|---|---|---|"]
    for row in mistakes:
        cell = str(row["text"]).replace("|", "\\|")
        lines.append(f"| {cell} | {row['actual']} | {row['predicted']} | {row['confidence']:.3f} |")
    return lines + [""]


def _gate_lines(gates: Sequence[Gate]) -> list[str]:
    lines = ["| gate | reads | value | threshold | status |", "|---|---|---|---|---|"]
    for gate in gates:
        reads = f"`{gate.metric}`" + (f" ({gate.detail})" if gate.detail else "")
        threshold = "off" if gate.threshold is None else f"{gate.threshold}"
        status = "off" if gate.threshold is None else ("passed" if gate.passed else "**failed**")
        lines.append(
            f"| `evaluate.{gate.key}` | {reads} | {gate.value:.4f} | {threshold} | {status} |"
        )
    failed = [gate.failure() for gate in gates if not gate.passed]
    lines.append("")
    lines += ["Gates: all passed."] if not failed else ["Gates failed:"]
    lines += [f"- {line}" for line in failed]
    return lines


def render_report(
    metrics: Mapping,
    gates: Sequence[Gate],
    params: Params,
    figures: Mapping[str, str],
    mistakes: Sequence[Mapping] | None = None,
) -> str:
    """The Markdown report; ``figures`` maps captions to paths relative to the report.
    ``mistakes`` (text models): the most confident wrong predictions, shown in a section."""
    shots = params.finetune.shots_per_class
    if shots is None:
        shots = "all"
    lines = [
        "# Evaluation",
        "",
        f"A base model trained on the base domain, fine-tuned on {shots} labelled examples per "
        f"class of the target domain, against the same network and a logistic regression "
        f"trained on those examples only. All figures are on held-out test rows "
        f"(`metrics/evaluate.json` holds them all).",
        "",
        "## Models",
        "",
        *_models_table(metrics, shots, params, text=mistakes is not None),
        "",
        _uncertainty_sentence(metrics, params),
        "",
        "## Transfer",
        "",
        *_transfer_lines(metrics, params),
        *_sklearn_lines(metrics),
        *_adaptive_lines(metrics),
        "",
        "## Worst classes",
        "",
        *_worst_class_lines(metrics),
        "",
        "## Confidence",
        "",
        *_confidence_lines(metrics),
        "",
        "## Gates",
        "",
        *_gate_lines(gates),
        "",
        *(_mistake_lines(mistakes) if mistakes is not None else []),
        "## Pictures",
    ]
    for caption, path in figures.items():
        lines += ["", f"**{caption}**", "", f"![{caption}]({path})"]
    return "\n".join(lines) + "\n"
