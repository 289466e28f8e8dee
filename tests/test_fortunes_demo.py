"""scripts/fortunes_demo.py on a tiny fake fortunes folder: parsing, labels, determinism, the
missing package, the params it writes and the table row (no fortunes package needed)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import fortunes_demo as demo  # noqa: E402


def fake_fortunes(root: Path) -> Path:
    """Every demo category with three quotations (one shared by two categories, one repeated),
    a plain-only file, a `.dat` index and an `off/` folder that must be skipped."""
    folder = root / "fortunes"
    (folder / "off").mkdir(parents=True)
    for name in demo.CATEGORIES:
        one = f"{name} one\n\t-- A. Author"
        body = f"{one}\n%\n{name} two\n%\nshared line\n%\n{one}\n%\n"
        (folder / f"{name}.u8").write_text(body, encoding="utf-8")
        (folder / name).write_bytes(b"latin-1 copy, ignored\n%\n")
        (folder / f"{name}.dat").write_bytes(b"\x00\x01binary")
    (folder / "cookie").write_bytes(b"caf\xe9 au lait\n%\n_\x08b_\x08o_\x08l_\x08d text\n%\n%\n")
    (folder / "off" / "rude.u8").write_text("never read\n%\n")
    return folder


def test_parse_splits_on_percent_lines_and_cleans_overstrikes() -> None:
    text = "first\nline\n%\n  \n%\n_\x08u_\x08n\x07der\n% \nlast"
    assert demo.parse_fortunes(text) == ["first\nline", "under", "last"]


def test_build_labels_dedupes_and_skips_off(tmp_path) -> None:
    rows, corpus = demo.build(fake_fortunes(tmp_path), per_class=5)
    # "shared line" stands under every category: ambiguous, so left out of the labelled set;
    # a quotation repeated within one file is kept once.
    assert rows[:2] == [
        ("computers one\n\t-- A. Author", "computers"),
        ("computers two", "computers"),
    ]
    assert len(rows) == 2 * len(demo.CATEGORIES)
    assert {label for _, label in rows} == set(demo.CATEGORIES)
    # The corpus: every quotation of every file (.u8 preferred, latin-1 decoded otherwise),
    # sorted by category, off/ skipped.
    assert corpus[4:6] == ["café au lait", "bold text"]  # computers < cookie < food ...
    assert corpus[:4] == ["computers one\n\t-- A. Author", "computers two", "shared line"] + [
        "computers one\n\t-- A. Author"
    ]
    assert len(corpus) == 2 + 4 * len(demo.CATEGORIES)
    assert "never read" not in corpus and "latin-1 copy, ignored" not in corpus
    assert demo.build(fake_fortunes(tmp_path / "again"), per_class=1)[0][0][1] == "computers"


def test_prepare_is_deterministic(tmp_path) -> None:
    folder = fake_fortunes(tmp_path)
    demo.prepare(folder, tmp_path / "a", per_class=2)
    demo.prepare(folder, tmp_path / "b", per_class=2)
    for name in ("fortunes.csv", "fortunes_corpus.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with (tmp_path / "a" / "fortunes.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["text", "category"] and table[1] == [
        "computers one\n\t-- A. Author",
        "computers",
    ]


def test_a_missing_package_is_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "fortunes_demo.py"), "prepare",
         "--fortunes", str(tmp_path / "absent"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "apt-get install fortunes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_category_is_an_error(tmp_path) -> None:
    folder = fake_fortunes(tmp_path)
    (folder / "sports.u8").unlink()
    (folder / "sports").unlink()
    with pytest.raises(demo.MissingFortunes, match="sports"):
        demo.build(folder)


def test_the_demo_params_pass_the_params_check() -> None:
    from stages.core.common.params import parse_params

    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = parse_params(demo.demo_params(shipped, []))
    assert params.model.arch == "hf" and params.train.objective == "mlm"
    assert params.model.tokenizer.kind == "wordpiece"


def test_demo_params_overlay_and_overrides() -> None:
    base = {"data": {"source": "sklearn:digits", "seed": 42}, "split": {"seed": 42},
            "train": {"epochs": 50, "lr": 0.01}}  # fmt: skip
    params = demo.demo_params(base, ["train.epochs=7", "finetune.shots_per_class=8"], corpus=False)
    assert params["train"]["epochs"] == 7 and params["finetune"]["shots_per_class"] == 8
    assert params["train"]["objective"] == "mlm" and params["model"]["hf"]["model_type"] == "bert"
    assert params["train"]["lr"] == demo.DEMO_PARAMS["train"]["lr"]
    assert params["split"] == base["split"] and "corpus" not in params["data"]
    assert params["data"]["seed"] == 42 and params["data"]["source"] == "data/source/fortunes.csv"
    assert demo.demo_params(base, [])["data"]["corpus"] == "data/source/fortunes_corpus.csv"


def test_table_row(tmp_path) -> None:
    block = {"accuracy": 0.5, "accuracy_ci95_low": 0.4, "accuracy_ci95_high": 0.6}
    evaluate = {
        "finetuned": block,
        "scratch": block | {"accuracy": 0.45},
        "sklearn": {"accuracy": 0.7},
        "transfer": {"finetuned_mean": 0.52, "scratch_mean": 0.32, "gain_mean": 0.2,
                     "gain_ci95_low": 0.1, "gain_ci95_high": 0.3, "gain_min": -0.01},
    }  # fmt: skip
    (tmp_path / "evaluate.json").write_text(json.dumps(evaluate))
    train = {"val_perplexity": 99.5, "texts": {"held_out": 3}}
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "train.csv").write_text("epoch,val_perplexity\n1,1946.84\n2,300.0\n")
    assert demo.table(tmp_path, tmp_path, "mlm") == (
        "| mlm | 0.520 | 0.320 | +0.200 [+0.100, +0.300] | -0.010 | 0.500 [0.400, 0.600] "
        "| 0.450 [0.400, 0.600] | 0.700 | 1947 -> 100 | 3 |"
    )
    assert demo.TABLE_HEADER.count("|") == 22
