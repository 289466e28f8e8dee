"""Training progress: a live tqdm bar on a terminal, one line per epoch elsewhere (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class EpochProgress:
    """Shows each finished epoch (``update(stats)``) of a run of ``total`` epochs.

    On a terminal: a tqdm bar with the epoch, train loss, val loss and accuracy and tqdm's ETA.
    Otherwise one line per epoch on ``stream``. ``done`` epochs are already behind (a resumed
    run). Nothing is shown without a ``label``.
    """

    def __init__(
        self,
        label: str | None,
        total: int,
        done: int = 0,
        stream: TextIO | None = None,
        live: bool | None = None,
    ):
        self.label = label
        self.total = total
        self.done = done
        self.stream = stream or sys.stdout
        self.live = sys.stderr.isatty() if live is None else live
        self.bar = None
        self.started = time.perf_counter()

    def __enter__(self) -> EpochProgress:
        if self.label and self.live:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=self.label,
                unit="epoch",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        return self

    def update(self, stats) -> None:
        if not self.label:
            return
        figures = {
            "loss": f"{stats.train_loss:.4f}",
            "val_loss": f"{stats.val_loss:.4f}",
            "val_acc": f"{stats.val_accuracy:.3f}",
        }
        if self.bar is not None:
            self.bar.set_postfix(figures, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        ran = stats.epoch - self.done
        eta = elapsed / ran * (self.total - stats.epoch) if ran > 0 else 0.0
        shown = " ".join(f"{k} {v}" for k, v in figures.items())
        print(
            f"{self.label}: epoch {stats.epoch}/{self.total} {shown} "
            f"({elapsed:.1f} s, eta {eta:.0f} s)",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
