"""The README and the docs site (docs/, mkdocs.yml) against the code they describe.

`make lint` builds the site with `mkdocs build --strict` (links, anchors, nav); these tests check
what a build cannot: every params.yaml key and its default on the params reference, the
code-layout table against the imports, and that the modules, flags, make targets and files that
the pages name exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CORE = REPO_ROOT / "stages" / "core"
STAGES = ["ingest", "validate", "split", "tokenize", "train", "finetune", "evaluate"]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (header and rule rows included)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def flat_keys(mapping: dict, prefix: str = "") -> dict[str, object]:
    """params.yaml's leaves as dotted keys: {"model.cnn.channels": [16, 32], ...}."""
    out: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def code_texts(markdown: str) -> list[str]:
    """Everything a reader would type: fenced code blocks and inline code spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.M | re.S)
    return fenced + re.findall(r"`([^`\n]+)`", prose)


def all_docs() -> dict[str, str]:
    texts = {"README.md": (REPO_ROOT / "README.md").read_text()}
    texts.update({f"docs/{page.name}": page.read_text() for page in PAGES})
    return texts


def test_every_params_yaml_key_has_a_row_with_its_default() -> None:
    """One row per key of params.yaml, in both directions, with the value params.yaml ships."""
    shipped = flat_keys(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    documented: dict[str, object] = {}
    for cells in table_rows((DOCS / "params.md").read_text()):
        key = re.fullmatch(r"`([a-z0-9_.]+)`", cells[0])
        if key and len(cells) == 3:
            assert key.group(1) not in documented, f"params.md: {key.group(1)} twice"
            documented[key.group(1)] = yaml.safe_load(cells[1].strip("`"))
    assert sorted(documented) == sorted(shipped)
    wrong = {key: (documented[key], value) for key, value in shipped.items()}
    wrong = {key: pair for key, pair in wrong.items() if pair[0] != pair[1]}
    assert not wrong, f"params.md's default differs from params.yaml: {wrong}"


def layout_table() -> dict[str, str]:
    """code-layout.md's subpackage table: name -> its 'may import' cell (and 'holds')."""
    rows = {}
    for cells in table_rows((DOCS / "code-layout.md").read_text()):
        name = re.fullmatch(r"`([a-z]+)`", cells[0])
        if name and len(cells) == 3:
            rows[name.group(1)] = (cells[1], cells[2])
    return rows


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_code_layout_names_every_subpackage_and_module() -> None:
    table = layout_table()
    packages = sorted(p.name for p in CORE.iterdir() if (p / "__init__.py").is_file())
    assert sorted(table) == packages
    for package, (holds, _) in table.items():
        for module in sorted((CORE / package).glob("*.py")):
            if module.stem != "__init__":
                assert f"`{module.stem}`" in holds, f"code-layout.md: {package}/{module.name}"


def test_imports_point_only_where_the_code_layout_allows() -> None:
    """Each subpackage imports only those its row names (arrows down), never the libraries its
    row excludes ("never torch"), and no core module imports a stage module."""
    table = layout_table()
    wrong = []
    for package, (_, may_import) in table.items():
        allowed = set(re.findall(r"`([a-z]+)`", may_import)) | {package}
        banned = set(re.findall(r"never (\w+)", may_import))
        for module in sorted((CORE / package).glob("*.py")):
            for name in imported_modules(module):
                parts = name.split(".")
                if parts[:2] == ["stages", "core"] and len(parts) > 2 and parts[2] in table:
                    if parts[2] not in allowed:
                        wrong.append(f"{package}/{module.name} imports {name}")
                elif parts[0] == "stages" and len(parts) > 1 and parts[1] in STAGES:
                    wrong.append(f"{package}/{module.name} imports the stage module {name}")
                elif parts[0] in banned:
                    wrong.append(f"{package}/{module.name} imports {name}")
    assert not wrong


def test_the_rule_is_checked_against_a_wrong_import(tmp_path: Path) -> None:
    """The import walk sees an import inside a function (the kind a layering slip hides in)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from stages.core.tracking import runs\n")
    assert "stages.core.tracking.runs" in imported_modules(module)


def python_modules_named() -> list[tuple[str, str, list[str]]]:
    """(page, module, its --flags on that line) for every `python -m` of ours the docs show."""
    found = []
    for page, text in all_docs().items():
        for code in code_texts(text):
            for line in code.splitlines():
                for match in re.finditer(
                    r"python -m ((?:stages|scripts|benchmarks)(?:\.\w+)+)", line
                ):
                    rest = line[match.end() :].split("#")[0]
                    found.append((page, match.group(1), re.findall(r"(--[a-z][\w-]*)", rest)))
    return found


def test_the_docs_show_the_commands_this_test_checks() -> None:
    named = {module for _, module, _ in python_modules_named()}
    # A regex that stopped matching would make the next test pass on nothing.
    assert {"stages.train", "stages.validate", "benchmarks.gpu", "scripts.sync_dvc_deps"} <= named


@pytest.mark.parametrize(("page", "module", "flags"), python_modules_named())
def test_python_modules_and_flags_the_docs_show_exist(page, module, flags) -> None:
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{page}: python -m {module}: no {path.relative_to(REPO_ROOT)}"
    source = path.read_text()
    if module.startswith("stages."):  # the stages' flags are parsed in stages/core/common/cli.py
        source += (CORE / "common" / "cli.py").read_text() + (CORE / "common" / "io.py").read_text()
    for flag in flags:
        assert f'"{flag}"' in source, f"{page}: python -m {module} {flag}: no such flag"


def test_make_targets_and_scripts_the_docs_show_exist() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    missing = []
    for page, text in all_docs().items():
        for code in code_texts(text):
            missing += [
                f"{page}: make {t}"
                for t in re.findall(r"\bmake ([a-z][\w-]*)", code)
                if t not in targets
            ]
            for script in re.findall(r"python ((?:scripts|benchmarks)/[\w/]+\.py)", code):
                if not (REPO_ROOT / script).is_file():
                    missing.append(f"{page}: {script}")
    assert not missing
    assert {"docs", "lint", "pipeline", "test"} <= targets


# Paths in git that the docs name; outputs (data/, models/, metrics/...) and local state (.team/,
# .checkpoints/) are made by runs and are not checked here.
CHECKED_PREFIXES = ("stages/", "scripts/", "benchmarks/", "tests/", ".ci/", ".github/", "docs/")
CHECKED_FILES = {"params.yaml", "dvc.yaml", "dvc.lock", "mkdocs.yml", "docker-compose.yml"}
CHECKED_FILES |= {"pyproject.toml", "requirements.lock", "Makefile", ".dvc/config"}


def test_repository_paths_the_docs_name_exist() -> None:
    missing = []
    for page, text in all_docs().items():
        links = re.findall(r"\]\(((?!https?:)[^)#\s]+)", text)
        base = REPO_ROOT if page == "README.md" else DOCS
        missing += [f"{page}: link {link}" for link in links if not (base / link).exists()]
        for code in code_texts(text):
            for match in re.finditer(r"[\w./-]+", code):
                if code[match.end() : match.end() + 1] in ("<", "{", "*"):
                    continue  # a pattern (stages/core/<package>/<module>.py), not a path
                token = match.group().rstrip(".")
                named = token.startswith(CHECKED_PREFIXES) or token in CHECKED_FILES
                if named and not (REPO_ROOT / token).exists():
                    missing.append(f"{page}: {token}")
    assert not missing


def test_dotted_names_of_our_code_exist() -> None:
    """`stages.core.engine.training.fit` and the like: the module, and the name defined in it."""
    missing = []
    for page, text in all_docs().items():
        for code in code_texts(text):
            for dotted in re.findall(
                r"\bstages\.(?:core|" + "|".join(STAGES) + r")\b(?:\.\w+)*", code
            ):
                parts = dotted.split(".")
                files = [n for n in range(2, len(parts) + 1) if _module_file(parts[:n]).is_file()]
                if not files:
                    if not (REPO_ROOT / "/".join(parts)).is_dir():
                        missing.append(f"{page}: {dotted}")
                    continue
                n = files[-1]
                defined = _module_file(parts[:n]).read_text()
                for name in parts[n : n + 1]:
                    if not re.search(rf"^(def|class) {name}\b|^{name}\b.*=", defined, re.M):
                        missing.append(f"{page}: {dotted}")
    assert not missing


def _module_file(parts: list[str]) -> Path:
    return REPO_ROOT / ("/".join(parts) + ".py")


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def test_the_site_home_repeats_the_readme_quick_start_word_for_word() -> None:
    """docs/index.md carries the README's quick start, measured times and results: one text."""
    readme = (REPO_ROOT / "README.md").read_text().replace("](docs/", "](")
    home = (DOCS / "index.md").read_text()
    assert between(home, "## Quick start", "\n## ") == between(readme, "## Quick start", "\n## ")
    assert "| fine-tuned on 5 shots/class (`finetuned`) | target-domain test |" in home


def test_every_page_is_in_the_nav() -> None:
    nav = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())["nav"]
    listed = sorted(page for entry in nav for page in entry.values())
    assert listed == sorted(page.name for page in PAGES)
