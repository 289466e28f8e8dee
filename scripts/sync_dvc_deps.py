"""Rewrite each stage's code deps in dvc.yaml to what tests/test_dvc_yaml.py derives from the
imports (the stage module first, then the modules it reaches); data deps stay as they are.

    .venv/bin/python -m scripts.sync_dvc_deps
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_dvc_yaml import code_deps, dvc_stages  # noqa: E402


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
