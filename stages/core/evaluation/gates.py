"""The evaluate stage's gates: which claims the metrics must hold."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.common.params import EvaluateParams


@dataclass(frozen=True)
class Gate:
    """One quality gate: the param that sets it, the metric it reads, and the outcome."""

    key: str
    metric: str
    value: float
    threshold: float | None  # None: the gate is off
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.threshold is None or self.value >= self.threshold

    def failure(self) -> str:
        """The one line a failed gate prints: param, metric, value and threshold."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"evaluate.{self.key}: {self.metric}{detail} {self.value:.4f} < {self.threshold}"


def gates(metrics: dict, params: EvaluateParams, base_gate: bool = True) -> list[Gate]:
    """Every gate, in a fixed order, with the value it reads. ``base_gate`` False (a
    one-domain text dataset, or a base model taken untrained) leaves the base-accuracy gate
    out, as does a metrics block without ``base``."""
    transfer, tuned = metrics["transfer"], metrics["finetuned"]
    base = []
    if base_gate and "base" in metrics:
        base = [Gate("min_base_accuracy", "base.accuracy", metrics["base"]["accuracy"],
                     params.min_base_accuracy)]  # fmt: skip
    return base + [
        Gate("min_transfer_gain", "transfer.gain_mean", transfer["gain_mean"],
             params.min_transfer_gain,
             f"finetuned - scratch accuracy, mean over {transfer['draws']} draws"),
        Gate("min_class_recall", "finetuned.worst_class_recall", tuned["worst_class_recall"],
             params.min_class_recall, f"class {tuned['worst_class']}"),
    ]  # fmt: skip


def failed_gates(metrics: dict, params: EvaluateParams) -> list[str]:
    """One line per gate the metrics miss."""
    return [gate.failure() for gate in gates(metrics, params) if not gate.passed]
