"""Rebuild .dvc/plots/index.html: the page `dvc plots show` fills, with Vega inlined.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline or behind a strict
proxy it shows a blank page. This page inlines the minified builds of the pinned npm packages
instead, and has no ``scripts`` placeholder, so DVC adds no remote script tags. `.dvc/config`
points `plots.html_template` at it.

Needs npm (it runs `npm pack`, from whichever registry your npm client is configured with) and
checks every tarball against the integrity pinned below. Run from the repo root:

    python scripts/build_plots_template.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# name: (version, npm's sha512 integrity of the package tarball)
PACKAGES = {
    "vega": (
        "5.33.1",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",  # noqa: E501
    ),
    "vega-lite": (
        "5.23.0",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",  # noqa: E501
    ),
    "vega-embed": (
        "6.29.0",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",  # noqa: E501
    ),
}
TEMPLATE = Path(".dvc/plots/index.html")
# DVC fills these with str.replace; an inlined build must not contain them.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {credits}: BSD-3-Clause, inlined from their npm packages by
         scripts/build_plots_template.py so that this page renders with no network. -->
{scripts}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def minified_build(name: str, version: str, expected: str, workdir: Path) -> str:
    """The package's build/<name>.min.js, from a tarball that matches its pinned integrity."""
    packed = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(workdir)],
        capture_output=True,
        text=True,
        check=True,
    )
    tarball = workdir / json.loads(packed.stdout)[0]["filename"]
    found = integrity(tarball.read_bytes())
    if found != expected:
        sys.exit(f"{name}@{version}: tarball integrity {found} is not the pinned {expected}")
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(f"package/build/{name}.min.js")
        assert member is not None, f"{name}@{version} has no build/{name}.min.js"
        code = member.read().decode("utf-8")
    # The source map is not shipped; a browser would only ask for it with devtools open.
    code = "\n".join(
        line for line in code.splitlines() if not line.startswith("//# sourceMappingURL=")
    )
    for bad in (*PLACEHOLDERS, "</script", "<!--"):
        if bad in code:
            sys.exit(f"{name}@{version}: the build contains {bad!r}; it cannot be inlined as is")
    return code


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        builds = [
            minified_build(name, version, expected, Path(workdir))
            for name, (version, expected) in PACKAGES.items()
        ]
    credits = ", ".join(f"{name} {version}" for name, (version, _) in PACKAGES.items())
    scripts = "\n".join(f"    <script>\n{code}\n    </script>" for code in builds)
    # Fill the build-time fields only; DVC's own placeholders stay for `dvc plots show`.
    page = PAGE.replace("{credits}", credits).replace("{scripts}", scripts)
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(page, encoding="utf-8")
    print(f"{TEMPLATE}: {credits}, {len(page.encode()) // 1024} KiB")


if __name__ == "__main__":
    main()
