"""dvc.yaml declares, for every stage, exactly the code it runs: the stage module and every
project module it imports, directly or through other modules (found with `ast`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from scripts.sync_dvc_deps import PACKAGE, code_deps, dvc_stages
from stages.core.common.params import Params


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_stage_lists_exactly_the_modules_it_imports(name: str) -> None:
    stage = dvc_stages()[name]
    listed = {d for d in stage["deps"] if d.startswith(f"{PACKAGE}/")}
    expected = code_deps(stage)
    fix = "(.venv/bin/python -m scripts.sync_dvc_deps rewrites them)"
    assert not expected - listed, f"{name}: dvc.yaml misses {sorted(expected - listed)} {fix}"
    assert not listed - expected, f"{name}: dvc.yaml lists unused {sorted(listed - expected)} {fix}"


def test_package_init_files_hold_no_code() -> None:
    for init in REPO_ROOT.glob(f"{PACKAGE}/**/__init__.py"):
        body = ast.parse(init.read_text()).body
        docstring_only = all(
            isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
        )
        assert docstring_only, f"{init}: code here would be a dependency of every stage"


def test_the_closure_follows_imports_inside_functions(tmp_path: Path) -> None:
    """The derivation itself: direct, `from package import module`, nested and lazy imports."""
    core = tmp_path / PACKAGE / "core"
    core.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text('"""pkg"""\n')
    (core / "__init__.py").write_text('"""core"""\n')
    (core / "a.py").write_text("from stages.core import b\n")
    (core / "b.py").write_text("def f():\n    import stages.core.c\n")
    (core / "c.py").write_text("import os\n")
    (core / "unused.py").write_text("")
    (tmp_path / PACKAGE / "stage.py").write_text("from stages.core.a import x\n")
    got = code_deps({"cmd": "python -m stages.stage"}, tmp_path)
    assert got == {f"{PACKAGE}/stage.py", *(f"{PACKAGE}/core/{m}.py" for m in "abc")}


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_stage_params_are_params_yaml_keys(name: str) -> None:
    """Every param a stage declares exists in params.yaml's schema (a typo would make DVC
    track nothing)."""
    fields = Params.model_fields
    sections = {field.alias or key: field.annotation for key, field in fields.items()}
    for entry in dvc_stages()[name].get("params", []):
        section, _, key = entry.partition(".")
        assert section in sections, f"{name}: unknown params section {section!r}"
        if key:
            assert key.split(".")[0] in sections[section].model_fields, f"{name}: {entry}"
