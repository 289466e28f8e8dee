"""Figures: fixed-size PNGs without metadata, byte-identical for the same inputs."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import REPO_ROOT

from stages.core.evaluation.figures import DPI, SIZE, draw_figures

CLASSES = [0, 1, 2]


def draw_sample(directory: Path | str, seed: int = 0) -> dict[str, bytes]:
    """Every figure of a small made-up evaluation (``seed`` draws its predictions)."""
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, 3, 60)
    predicted = np.where(rng.random(60) < 0.8, actual, (actual + 1) % 3)
    history = pd.DataFrame(
        {
            "epoch": np.arange(1, 11),
            "train_loss": np.linspace(2, 0.2, 10),
            "val_loss": np.linspace(2.1, 0.4, 10),
            "val_accuracy": np.linspace(0.3, 0.9, 10),
        }
    )
    proba = rng.dirichlet([1, 1, 1], 60)
    proba[np.arange(60), predicted] += 1  # the predicted class is the most probable
    drawn = draw_figures(
        directory,
        pd.DataFrame({"actual": actual, "predicted": predicted}),
        proba / proba.sum(axis=1, keepdims=True),
        CLASSES,
        histories={"train": history, "finetune": history.iloc[:5]},
        recalls={"base": {"0": 0.9, "1": 1.0, "2": 0.8}, "finetuned": {"0": 0.7, "2": 1.0}},
    )
    return {path.name: path.read_bytes() for path in drawn.values()}


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + data)
        chunks.append((kind, data))
        at += 12 + length
    return chunks


def test_figures_are_fixed_size_pngs_without_metadata(tmp_path: Path) -> None:
    drawn = draw_sample(tmp_path / "figures")
    assert sorted(drawn) == [
        "confusion_finetuned.png",
        "per_class_recall.png",
        "reliability_finetuned.png",
        "training_curves.png",
    ]
    for name, png in drawn.items():
        chunks = _chunks(png)
        kinds = {kind for kind, _ in chunks}
        # No text (Software, dates) and no time chunk: nothing that changes between runs.
        assert not kinds & {b"tEXt", b"zTXt", b"iTXt", b"tIME"}, name
        width, height = struct.unpack(">II", chunks[0][1][:8])
        assert (width, height) == (SIZE[0] * DPI, SIZE[1] * DPI), name
        assert_drawn(tmp_path / "figures" / name)


def test_same_inputs_same_bytes_across_processes(tmp_path: Path) -> None:
    here = draw_sample(tmp_path / "here")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    code = f"from test_figures import draw_sample; draw_sample({str(tmp_path / 'there')!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    there = {p.name: p.read_bytes() for p in (tmp_path / "there").iterdir()}
    assert there == here
    other = draw_sample(tmp_path / "other", seed=1)  # other predictions: other pictures
    assert other["confusion_finetuned.png"] != here["confusion_finetuned.png"]
    assert other["reliability_finetuned.png"] != here["reliability_finetuned.png"]


def test_sure_model_leaves_calibration_bins_empty(tmp_path: Path) -> None:
    """Every row in the top confidence bin: the empty bins (NaN) must not break the drawing."""
    history = pd.DataFrame(
        {
            "epoch": [1, 2],
            "train_loss": [1.0, 0.5],
            "val_loss": [1.0, 0.6],
            "val_accuracy": [0.5, 1],
        }
    )
    drawn = draw_figures(
        tmp_path,
        pd.DataFrame({"actual": [0, 1, 2], "predicted": [0, 1, 2]}),
        np.eye(3) * 0.98 + 0.01 / 1.5,
        CLASSES,
        histories={"train": history},
        recalls={"finetuned": {"0": 1.0, "1": 1.0, "2": 1.0}},
    )
    assert sorted(path.name for path in drawn.values()) == [
        "confusion_finetuned.png",
        "per_class_recall.png",
        "reliability_finetuned.png",
        "training_curves.png",
    ]
    for path in drawn.values():
        assert_drawn(path)


def assert_drawn(path: Path) -> None:
    """The PNG decodes to the fixed size and holds a picture: not one flat colour, and ink
    (pixels off the white background) over a real part of it."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", path
        assert image.size == (SIZE[0] * DPI, SIZE[1] * DPI), path
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, path  # more than a few colours
    ink = (pixels < 240).any(axis=2).mean()
    assert 0.01 < ink < 0.9, (path, ink)
