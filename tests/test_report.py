"""reports/evaluation.md: the tables, the sentence on uncertainty, the gates and the pictures."""

from __future__ import annotations

from stages.core.common.params import EvaluateParams, parse_params
from stages.core.evaluation.baselines import summarize_draws
from stages.core.evaluation.gates import gates
from stages.core.evaluation.report import render_report

FIGURES = {"Confusion matrix": "figures/confusion.png", "Recall per class": "figures/recall.png"}


def _block(accuracy: float, low: float, high: float, support: int = 180) -> dict:
    return {
        "accuracy": accuracy,
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "recall_macro": accuracy - 0.001,
        "recall_macro_ci95_low": low - 0.001,
        "recall_macro_ci95_high": high - 0.001,
        "f1_macro": accuracy - 0.002,
        "f1_macro_ci95_low": low - 0.002,
        "f1_macro_ci95_high": high - 0.002,
        "support": support,
    }


def _per_class(recalls: dict[str, float]) -> dict:
    return {
        label: {"precision": 0.9, "recall": recall, "f1": 0.8, "support": 0 if recall < 0 else 18}
        for label, recall in recalls.items()
    }


def _metrics(draws: tuple[list[float], list[float]] = ([0.911, 0.925], [0.878, 0.80])) -> dict:
    tuned = _block(0.911, 0.872, 0.950) | {
        "per_class": _per_class({"0": 0.95, "1": 0.889, "2": -1, "3": 0.7, "4": 0.778}),
        "roc_auc_ovr": 0.9961,
        "log_loss": 0.2831,
        "ece": 0.0458,
        "worst_class": "3",
        "worst_class_recall": 0.7,
    }
    base = _block(0.95, 0.911, 0.978) | {
        "per_class": _per_class({"0": 1.0, "1": 0.9, "8": 0.722}),
        "roc_auc_ovr": None,
        "log_loss": 0.152,
        "ece": 0.039,
        "worst_class": "8",
        "worst_class_recall": 0.722,
    }
    return {
        "base": base,
        "finetuned": tuned,
        "scratch": _block(0.878, 0.828, 0.922),
        "sklearn": _block(0.856, 0.806, 0.906),
        "transfer_gain": 0.033,
        "transfer": summarize_draws(*draws),
    }


def _render(metrics: dict, **evaluate) -> list[str]:
    params = parse_params({"evaluate": evaluate})
    return render_report(metrics, gates(metrics, params.evaluate), params, FIGURES).splitlines()


def test_models_table_with_intervals() -> None:
    lines = _render(_metrics())
    assert lines[0] == "# Evaluation"
    header = (
        "| model | trained as | scored on | accuracy [95% CI] | recall, macro [95% CI] "
        "| F1, macro [95% CI] |"
    )
    assert header in lines
    assert (
        "| finetuned | fine-tuned on 5 shots/class | target-domain test | 0.911 [0.872, 0.950] "
        "| 0.910 [0.871, 0.949] | 0.909 [0.870, 0.948] |" in lines
    )
    assert "| base | base model | base-domain test | 0.950 [0.911, 0.978] |" in " ".join(lines)
    # No zero_shot block (the target has classes the base model lacks): n/a, not a crash
    zero_shot = "| zero_shot | base model, no adaptation | target-domain test | n/a | n/a | n/a |"
    assert zero_shot in lines


def test_the_report_says_how_uncertain_one_accuracy_is() -> None:
    text = "\n".join(_render(_metrics()))
    # (0.950 - 0.872) / 2 = 0.039 at 95%; / 1.96 = 0.020 as one standard error
    assert (
        "With 180 test rows, one accuracy figure is uncertain by about ±0.039 at 95% (half the "
        "width of the fine-tuned model's interval, 0.872 to 0.950; about ±0.020 is one standard "
        "error), so differences of that size between two models on this test set can be noise."
        in text
    )
    assert "(2000 resamples, seed 42)" in text


def test_transfer_with_its_interval() -> None:
    text = "\n".join(_render(_metrics()))
    summary = _metrics()["transfer"]
    low, high = summary["gain_ci95_low"], summary["gain_ci95_high"]
    assert (
        f"by **+0.079** accuracy, averaged over 2 draws of the shots (seeds 42-43; 95% "
        f"t-interval {low:+.3f} to {high:+.3f}; worst draw +0.033)." in text
    )
    assert "| shipped draw (seed 42) | 0.911 | 0.878 | +0.033 |" in text
    assert "| mean over 2 draws | 0.918 | 0.839 | +0.079 |" in text
    single = "\n".join(_render(_metrics(([0.911], [0.878]))))
    assert "(seed 42; no interval with a single draw; worst draw +0.033)" in single
    worse = "\n".join(_render(_metrics(([0.80], [0.85]))))
    assert "Fine-tuning trails the same network trained from scratch on the same shots by " in worse
    assert "**-0.050** accuracy" in worse


def test_worst_classes_lowest_recall_first() -> None:
    lines = _render(_metrics())
    start = lines.index("## Worst classes")
    assert lines[start + 2] == "| model | class | recall | precision | F1 | test rows |"
    assert lines[start + 4 : lines.index("## Confidence") - 1] == [
        "| finetuned | 3 | 0.700 | 0.900 | 0.800 | 18 |",
        "| finetuned | 4 | 0.778 | 0.900 | 0.800 | 18 |",
        "| finetuned | 1 | 0.889 | 0.900 | 0.800 | 18 |",  # class 2 has no test rows
        "| base | 8 | 0.722 | 0.900 | 0.800 | 18 |",
        "| base | 1 | 0.900 | 0.900 | 0.800 | 18 |",
        "| base | 0 | 1.000 | 0.900 | 0.800 | 18 |",
    ]
    assert "| base | n/a | 0.152 | 0.039 |" in lines  # ROC AUC undefined


def test_gates_table_and_failures() -> None:
    passed = _render(_metrics())
    assert "| `evaluate.min_base_accuracy` | `base.accuracy` | 0.9500 | 0.93 | passed |" in passed
    off = "| `evaluate.min_class_recall` | `finetuned.worst_class_recall` (class 3) | 0.7000 | off"
    assert f"{off} | off |" in passed
    assert "Gates: all passed." in passed
    failed = _render(_metrics(), min_class_recall=0.75, min_base_accuracy=0.96)
    assert (
        "| `evaluate.min_class_recall` | `finetuned.worst_class_recall` (class 3) | 0.7000 "
        "| 0.75 | **failed** |" in failed
    )
    at = failed.index("Gates failed:")
    assert failed[at + 1 : at + 3] == [
        "- evaluate.min_base_accuracy: base.accuracy 0.9500 < 0.96",
        "- evaluate.min_class_recall: finetuned.worst_class_recall (class 3) 0.7000 < 0.75",
    ]
    assert [g.key for g in gates(_metrics(), EvaluateParams())] == [
        "min_base_accuracy",
        "min_transfer_gain",
        "min_class_recall",
    ]


def test_pictures_are_relative_links() -> None:
    lines = _render(_metrics())
    at = lines.index("## Pictures")
    assert lines[at:] == [
        "## Pictures",
        "",
        "**Confusion matrix**",
        "",
        "![Confusion matrix](figures/confusion.png)",
        "",
        "**Recall per class**",
        "",
        "![Recall per class](figures/recall.png)",
    ]
    assert _render(_metrics()) == lines  # same metrics, same text


def test_a_scratch_control_trained_like_the_fine_tuning_is_named_so() -> None:
    """evaluate.scratch_strategy same: the report does not call the control "from scratch"."""
    params = parse_params(
        {
            "data": {"text_column": "review", "features": None},
            "model": {"arch": "hf", "pretrained": "data/models/bert"},
            "evaluate": {"scratch_strategy": "same"},
        }
    )
    metrics = _metrics()
    text = render_report(metrics, gates(metrics, params.evaluate), params, FIGURES)
    assert (
        "Fine-tuning beats the same network from random weights, trained as the fine-tuning is "
        "(head), on the same shots by **+0.079** accuracy" in text
    )
    assert "| scratch | same net from random weights, head on the 5 shots |" in text
    assert "trained from scratch" not in text and "from scratch on the" not in text
