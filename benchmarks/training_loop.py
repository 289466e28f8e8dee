"""Our training loop (stages.core.engine.training.fit) vs a bare PyTorch loop on the same work.

Prints the throughput ratio (target >= 0.9). Run from the repo root:
    .venv/bin/python -m benchmarks.training_loop
"""

from __future__ import annotations

import time

import torch
from torch import nn

from stages.core.engine.training import FitOptions, fit
from stages.core.modeling.model import Classifier, ModelConfig

N_TRAIN, N_VAL, N_FEATURES, N_CLASSES, EPOCHS, BATCH = 1000, 100, 64, 10, 60, 64


def make_model() -> Classifier:
    torch.manual_seed(0)
    config = ModelConfig(
        arch="mlp",
        n_features=N_FEATURES,
        hidden=[128, 64],
        dropout=0.0,
        classes=list(range(N_CLASSES)),
        feature_names=[f"f{i}" for i in range(N_FEATURES)],
        mean=[0.0] * N_FEATURES,
        std=[1.0] * N_FEATURES,
    )
    return Classifier(config)


def bare_loop(model: nn.Module, x, y, x_val, y_val) -> None:
    """The minimal equivalent: shuffle, batches, Adam, plus one val pass per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            nn.functional.cross_entropy(model(x_val), y_val)


def best_of(runs: int, work) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN, N_FEATURES, generator=generator)
    y = torch.randint(0, N_CLASSES, (N_TRAIN,), generator=generator)
    x_val, y_val = x[:N_VAL], y[:N_VAL]
    options = FitOptions(epochs=EPOCHS, batch_size=BATCH, lr=1e-3, device="cpu", cpu_threads=1)
    torch.set_num_threads(1)  # the same for both loops
    # Warm-up: the first optimizer built imports torch._dynamo (~2 s), once per process.
    bare_loop(make_model(), x[:BATCH], y[:BATCH], x_val, y_val)
    bare = best_of(5, lambda: bare_loop(make_model(), x, y, x_val, y_val))
    ours = best_of(5, lambda: fit(make_model(), (x, y), (x_val, y_val), options))
    print(f"bare loop: {bare:.3f} s  fit(): {ours:.3f} s  for {EPOCHS} epochs of {N_TRAIN} rows")
    print(f"throughput ratio fit/bare: {bare / ours:.2f}x (target >= 0.9)")


if __name__ == "__main__":
    main()
