"""dvc.yaml declares, for every stage, exactly the code it runs: the stage module and every
project module it imports, directly or through other modules (found with `ast`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from stages.core.params import Params

PACKAGE = "stages"


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of project module ``name`` (``stages.core.data``), or None if it is not one."""
    path = root.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(source: Path, root: Path = REPO_ROOT) -> set[Path]:
    """Project modules that ``source`` imports anywhere in its body (top level or inside a
    function: both run when the stage does)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from stages.core import layout` imports the module stages.core.layout.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == PACKAGE and (path := module_file(name, root)):
                found.add(path)
    return found


def closure(start: Path, root: Path = REPO_ROOT) -> set[Path]:
    """``start`` and every project module it reaches through imports."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(path, root) - seen)
    return seen


def code_deps(stage: dict, root: Path = REPO_ROOT) -> set[str]:
    """What the stage's code depends on, as dvc.yaml paths; package ``__init__`` files hold
    no code (checked below), so they are left out."""
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    files = closure(module_file(module, root), root)
    return {p.relative_to(root).as_posix() for p in files if p.name != "__init__.py"}


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
