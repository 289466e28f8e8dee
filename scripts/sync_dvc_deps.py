"""Rewrite each stage's code deps in dvc.yaml to what the imports say (the stage module first,
then every project module it reaches, found with `ast`); data deps stay as they are.
tests/test_dvc_yaml.py fails when dvc.yaml and this derivation disagree.

    .venv/bin/python -m scripts.sync_dvc_deps
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stages"


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module ``name`` (``stages.core.data.ingest``), or None if it is
    not one."""
    path = root.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(source: Path, root: Path = ROOT) -> set[Path]:
    """Project modules that ``source`` imports anywhere in its body (top level or inside a
    function: both run when the stage does)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from stages.core.common import layout` imports the module stages.core.common.layout.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == PACKAGE and (path := module_file(name, root)):
                found.add(path)
    return found


def closure(start: Path, root: Path = ROOT) -> set[Path]:
    """``start`` and every project module it reaches through imports."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(path, root) - seen)
    return seen


def code_deps(stage: dict, root: Path = ROOT) -> set[str]:
    """What the stage's code depends on, as dvc.yaml paths; package ``__init__`` files hold
    no code (checked below), so they are left out."""
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    files = closure(module_file(module, root), root)
    return {p.relative_to(root).as_posix() for p in files if p.name != "__init__.py"}


def main() -> None:
    path = ROOT / "dvc.yaml"
    text = path.read_text()
    for name, stage in dvc_stages().items():
        block = re.search(rf"\n  {name}:\n    cmd: .*\n    deps:\n((?:      - .*\n)+)", text)
        if block is None:
            sys.exit(f"dvc.yaml: stage {name}: expected `cmd:` then `deps:` as a list")
        module = f"stages/{stage['cmd'].split('python -m stages.', 1)[1].split()[0]}.py"
        code = [module, *sorted(code_deps(stage) - {module})]
        data = [line for line in block.group(1).splitlines() if "- stages/" not in line]
        lines = [f"      - {p}" for p in code] + data
        text = text[: block.start(1)] + "\n".join(lines) + "\n" + text[block.end(1) :]
    path.write_text(text)


if __name__ == "__main__":
    main()
