"""Render `dvc plots show` in headless Chromium with every host name unresolvable, and check that
every chart drew. Writes a screenshot to look at. Needs chromium on PATH; run from the repo root:

    python scripts/check_plots_offline.py [--screenshot plots.png]

Exit status 0 when each embedded chart became a drawn canvas, 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    # No network at all: any host name fails to resolve, so a remote script could not load.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=20000",
]


def chromium(page: Path, profile: Path, *action: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found (apt-get install chromium)")
    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, default=Path("plots-offline.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "page"
        subprocess.run(["dvc", "plots", "show", "-o", str(out)], check=True, capture_output=True)
        page = out / "index.html"
        html = page.read_text()
        charts = html.count("vegaEmbed('#")
        dom = chromium(page, Path(scratch) / "profile-dom", "--dump-dom")
        chromium(
            page,
            Path(scratch) / "profile-shot",
            f"--screenshot={args.screenshot.resolve()}",
            "--window-size=1400,3200",
        )
    remote = re.findall(r"<script[^>]*\ssrc\s*=\s*\"([^\"]+)\"", html)
    drawn = len(re.findall(r'class="vega-embed', dom))
    canvases = len(re.findall(r'<canvas[^>]*class="marks"', dom))
    print(f"charts embedded: {charts}, drawn: {drawn}, canvases: {canvases}")
    print(f"remote scripts: {remote or 'none'}; screenshot: {args.screenshot}")
    sys.exit(0 if charts and drawn == canvases == charts and not remote else 1)


if __name__ == "__main__":
    main()
