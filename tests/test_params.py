"""params.yaml -> typed params; every problem is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml
from conftest import REPO_ROOT

from stages.core.common.cli import run_stage
from stages.core.common.errors import ParamsError
from stages.core.common.params import Params, load_params, parse_params
from stages.core.engine.training import fit_options


def _error(raw: dict, path: str = "params.yaml") -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw, path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


def test_defaults_match_the_documented_shape(params: Params) -> None:
    assert params.data.source == "sklearn:digits"
    assert params.data.domain_column is None
    assert (params.data.base_domain, params.data.target_domain) == ("base", "target")
    assert params.validate_.feature_range == (0, 16)
    assert params.validate_.max_quarantine_fraction == 0.05
    assert (params.split.seed, params.split.test_size, params.split.val_size) == (42, 0.2, 0.1)
    assert params.model.hidden == [128, 64]
    assert params.train.patience == 10
    assert params.finetune.strategy == "head"
    assert params.evaluate.min_transfer_gain == 0.03
    assert params.evaluate.min_class_recall is None  # the gate is off unless set
    assert (params.evaluate.bootstrap_resamples, params.evaluate.bootstrap_seed) == (2000, 42)


def test_section_is_plain_data_keyed_as_in_params_yaml(params: Params) -> None:
    validate = params.section("validate")
    assert validate == {
        "feature_range": [0.0, 16.0],
        "max_quarantine_fraction": 0.05,
        "min_rows_per_class": 5,
        "text_length": [1, 20000],
        "suite": None,
    }
    assert params.section("split") == {"seed": 42, "test_size": 0.2, "val_size": 0.1}


def test_train_section_builds_fit_options(params: Params) -> None:
    """stages/train.py builds FitOptions from the train section; launch keys are not options."""
    options = fit_options(params.section("train"))
    assert options.epochs == params.train.epochs
    assert options.patience == params.train.patience
    assert not hasattr(options, "nproc") and not hasattr(options, "checkpoint_every")


def test_params_are_frozen(params: Params) -> None:
    with pytest.raises(pydantic.ValidationError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_validate_section_reads_from_its_yaml_name() -> None:
    params = parse_params({"validate": {"feature_range": None, "min_rows_per_class": 2}})
    assert params.validate_.feature_range is None
    assert params.validate_.min_rows_per_class == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
        ({"trian": {"lr": 0.1}}, "unknown key 'trian'"),
        ({"validate": {"max_fraction": 0.1}}, "unknown key 'validate.max_fraction'"),
        ({"train": {"epochs": "many"}}, "train.epochs: "),
        ({"train": {"epochs": 2.5}}, "train.epochs: "),
        ({"train": 5}, "train: "),
        ({"model": {"hidden": "wide"}}, "model.hidden: "),
        ({"train": {"lr": 0}}, "train.lr: "),
        ({"train": {"lr": -0.1}}, "train.lr: "),
        ({"train": {"epochs": 0}}, "train.epochs: "),
        ({"train": {"patience": 0}}, "train.patience: "),
        ({"train": {"device": "gpu"}}, "train.device: "),
        ({"train": {"precision": "fp16"}}, "train.precision: "),
        ({"finetune": {"strategy": "prompt"}}, "finetune.strategy: "),
        ({"finetune": {"shots_per_class": 0}}, "finetune.shots_per_class: "),
        ({"model": {"hidden": [64, 0]}}, "model.hidden: "),
        ({"model": {"hidden": []}}, "model.hidden: "),
        ({"model": {"dropout": 1.0}}, "model.dropout: "),
        ({"model": {"scaling": "minmax"}}, "model.scaling: "),
        ({"validate": {"max_quarantine_fraction": 1.5}}, "validate.max_quarantine_fraction: "),
        ({"validate": {"feature_range": [16, 0]}}, "validate.feature_range: "),
        ({"validate": {"min_rows_per_class": 0}}, "validate.min_rows_per_class: "),
        ({"split": {"test_size": 1.0}}, "split.test_size: "),
        ({"data": {"target_fraction": 1.0}}, "data.target_fraction: "),
        ({"data": {"target_transform": "blur"}}, "data.target_transform: "),
        ({"evaluate": {"min_base_accuracy": 1.2}}, "evaluate.min_base_accuracy: "),
        ({"evaluate": {"min_class_recall": -0.1}}, "evaluate.min_class_recall: "),
        ({"evaluate": {"bootstrap_resamples": 10}}, "evaluate.bootstrap_resamples: "),
        ({"data": {"source": "https://example.org/d.csv"}}, "data.sha256: "),
        ({"data": {"sha256": "A" * 64, "source": "data/source/x.csv"}}, "data.sha256: "),
        ({"data": {"sha256": "a" * 64}}, "data.sha256: "),  # sklearn: has no file to check
        ({"data": {"download_timeout": 0}}, "data.download_timeout: "),
        ({"data": {"image_mode": "cmyk"}}, "data.image_mode: "),
        ({"data": {"image_shape": [8]}}, "data.image_shape: "),
        ({"data": {"image_shape": [3, 8, 8]}}, "data.image_shape: "),  # grey needs 1 channel
        ({"data": {"image_mode": "rgb", "image_shape": [8, 8]}}, "data.image_shape: "),
        ({"validate": {"suite": "suite.json"}}, "validate.suite: "),
        ({"validate": {"suite": "data/suites/raw.yaml"}}, "validate.suite: "),
        ({"tracking": {"experiment": ""}}, "tracking.experiment: "),
        ({"validate": {"suite": "data/suites/../../x.json"}}, "validate.suite: "),
        ({"validate": {"suite": "data/suites/../raw.json"}}, "validate.suite: "),
        ({"validate": {"suite": "/repo/data/suites/raw.json"}}, "validate.suite: "),
        ({"data": {"source": "/srv/data/own.csv"}}, "data.source: "),
        ({"data": {"source": "../own.csv"}}, "data.source: "),
        ({"data": {"source": "data/source/../../../own.csv"}}, "data.source: "),
    ],
)
def test_bad_value_is_one_line_naming_the_key(raw: dict, expected: str) -> None:
    assert expected in _error(raw)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("suite", "data/suites/../../x.json", "under data/suites/"),
        ("suite", "/abs/data/suites/raw.json", "inside the repository"),
        ("source", "/abs/own.csv", "inside the repository"),
        ("source", "data/../../own.csv", "climbs out of the repository (resolves to ../own.csv)"),
    ],
)
def test_a_path_outside_its_folder_says_why(key: str, value: str, why: str) -> None:
    section = "validate" if key == "suite" else "data"
    message = _error({section: {key: value}})
    assert message.startswith(f"params.yaml: {section}.{key}: ")
    assert why in message and f"(got {value!r})" in message
    assert "DVC" in message and "rerun" in message


@pytest.mark.parametrize(
    "raw",
    [
        {"validate": {"suite": "data/suites/./raw.json"}},
        {"validate": {"suite": "data/suites/old/../raw.json"}},
        {"data": {"source": "data/source/scans/../own.csv"}},
        {"data": {"source": "https://example.org/../d.csv", "sha256": "a" * 64}},
    ],
)
def test_paths_that_resolve_inside_their_folder_pass(raw: dict) -> None:
    parse_params(raw)


def test_wrong_type_shows_the_offending_value() -> None:
    assert "(got 'many')" in _error({"train": {"epochs": "many"}})


@pytest.mark.parametrize(("test_size", "val_size"), [(0.5, 0.5), (0.6, 0.4), (0.7, 0.5)])
def test_split_must_leave_rows_for_training(test_size: float, val_size: float) -> None:
    message = _error({"split": {"test_size": test_size, "val_size": val_size}})
    assert message.startswith("params.yaml: split: ")
    assert "test_size + val_size" in message


def test_split_just_under_one_is_accepted() -> None:
    params = parse_params({"split": {"test_size": 0.5, "val_size": 0.49}})
    assert params.split.test_size + params.split.val_size < 1


def test_equal_domains_are_rejected() -> None:
    message = _error({"data": {"base_domain": "scanner", "target_domain": "scanner"}})
    assert message.startswith("params.yaml: data: ")
    assert "base_domain and target_domain must differ" in message


def test_only_the_first_of_several_errors_is_reported() -> None:
    message = _error({"train": {"lr": 0, "epochs": 0}, "model": {"hidden": []}})
    assert message.count("params.yaml") == 1


def test_error_names_the_file_it_came_from() -> None:
    assert _error({"train": {"lrr": 1}}, "conf/exp.yaml").startswith("conf/exp.yaml: ")


def test_params_error_stops_a_stage_in_one_line(capsys) -> None:
    def main() -> None:
        parse_params({"train": {"lr": -1}})

    with pytest.raises(SystemExit) as caught:
        run_stage("train", main)
    assert caught.value.code == 1
    assert capsys.readouterr().err == (
        "train: error: params.yaml: train.lr: Input should be greater than 0 (got -1)\n"
    )


def test_repo_params_yaml_is_read_key_for_key() -> None:
    """Every value written in the repo's params.yaml is the value the stages get."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = load_params(REPO_ROOT / "params.yaml")
    for name, section in raw.items():
        loaded = params.section(name)
        for key, value in section.items():
            expected = list(value) if isinstance(value, tuple) else value
            assert loaded[key] == expected, f"{name}.{key}"


def test_load_params_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3   # YAML 1.1 reads this as a string\n  epochs: 3\n")
    params = load_params(path)
    assert params.train.lr == pytest.approx(0.001)
    assert params.train.epochs == 3
    assert params.finetune == parse_params({}).finetune


def test_load_params_defaults_to_params_yaml_in_cwd(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("split: {seed: 7}\n")
    assert load_params().split.seed == 7


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# nothing set\n")
    assert load_params(path) == parse_params({})


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match="file not found") as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: file not found"


def test_bad_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1, 0.2\n  epochs: 3\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "\n" not in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- train\n- split\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(path)


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  shots: 5\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: unknown key 'finetune.shots'"


def test_source_params_that_are_accepted() -> None:
    sha = "0123456789abcdef" * 4
    params = parse_params(
        {
            "data": {"source": "https://example.org/d.csv", "sha256": sha},
            "validate": {"suite": "data/suites/raw.json"},
        }
    )
    assert params.data.sha256 == sha
    assert params.validate_.suite == "data/suites/raw.json"
    rgb = parse_params({"data": {"image_mode": "rgb", "image_shape": [3, 32, 32]}})
    assert rgb.data.image_shape == [3, 32, 32]
    assert parse_params({"data": {"image_shape": [1, 28, 28]}}).data.image_shape == [1, 28, 28]
