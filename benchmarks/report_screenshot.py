"""The demo federation's HTML report, rendered by headless Chromium and checked.

Runs the demo federation in process (the real ClientApp, server loop and strategies, with every
baseline), renders ``report.html``, takes a screenshot with Debian's ``chromium`` package and
checks that the picture shows the report: not blank, the expected size, the per-site tables
(their header colour) near the top and the plots (the sites' line and bar colours) below.

    python -m benchmarks.report_screenshot          # writes docs/report-screenshot.png

``tests/test_report_screenshot.py`` takes and checks a screenshot the same way (it skips, saying
why, when Chromium is not installed: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import ROOT

__all__ = ["WIDTH", "check_screenshot", "find_chromium", "render_demo_report", "screenshot"]

WIDTH = 1280
HEIGHT = 3600
OUTPUT = ROOT / "docs" / "report-screenshot.png"

_TABLE_HEADER = (242, 244, 247)  # th background (#f2f4f7, server/report.py)
_SITE_COLOURS = {"blue": (31, 119, 180), "red": (214, 39, 40), "green": (44, 160, 44)}


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render_demo_report(output_dir: Path, *overrides: str) -> Path:
    """Run the demo federation in process with every baseline; return its ``report.html``."""
    from clinfed.baselines import add_baselines
    from clinfed.config import load_simulation_config
    from clinfed.server.report import write_report
    from clinfed.server.results import write_evaluation, write_results
    from clinfed.simulation import run_inprocess_federation

    config = load_simulation_config(
        ROOT / "conf" / "simulate.yaml", [f"output_dir={output_dir}", *overrides]
    )
    result = run_inprocess_federation(config)
    folder = write_results(result, output_dir)
    if result.evaluation is not None and config.run.report.baselines:
        add_baselines(config, result.evaluation)
        write_evaluation(result.evaluation, folder)
    return write_report(folder)


def screenshot(html: Path, png: Path, *, chromium: str, height: int = HEIGHT) -> Path:
    """Render ``html`` in headless Chromium, ``WIDTH`` × ``height`` CSS pixels, into ``png``."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # root in CI containers; the page is our own local file
                "--disable-gpu",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{height}",
                f"--screenshot={png}",
                html.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    return png


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> np.ndarray:
    return np.asarray(np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance)


def check_screenshot(png: Path, *, height: int = HEIGHT) -> list[str]:
    """What is wrong with the screenshot (empty: it shows the report's tables and plots)."""
    image = Image.open(png).convert("RGB")
    problems = []
    if image.size != (WIDTH, height):
        problems.append(f"size {image.size}, expected {(WIDTH, height)}")
    pixels = np.asarray(image, dtype=np.int16)
    ink = (pixels < 235).any(axis=-1)
    if ink.mean() < 0.03:
        problems.append(f"almost blank: {ink.mean():.1%} of pixels are not white")
    band = height // 6
    empty = [i for i in range(6) if ink[i * band : (i + 1) * band].mean() < 0.01]
    if empty:
        problems.append(f"horizontal band(s) {empty} of 6 are empty")
    header = _near(pixels, _TABLE_HEADER, tolerance=3)
    top = header[: height // 3]
    if top.sum() < 2_000:
        problems.append("no table header in the top third (the per-site table should be there)")
    for name, colour in _SITE_COLOURS.items():
        if _near(pixels, colour).sum() < 1_500:
            problems.append(f"almost no {name} plot ink: the plots did not render")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp:
        html = render_demo_report(Path(tmp))
        raw = screenshot(html, Path(tmp) / "shot.png", chromium=chromium)
        problems = check_screenshot(raw)
        if problems:
            raise SystemExit(f"the screenshot does not show the report: {'; '.join(problems)}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        # A 256-colour palette keeps the committed picture small; the check ran on the original.
        Image.open(raw).convert("RGB").quantize(colors=256).save(args.output, optimize=True)
    print(args.output)


if __name__ == "__main__":
    main()
