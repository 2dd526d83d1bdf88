"""The report as a reader sees it: rendered by headless Chromium, checked for tables and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import import_benchmark

_shot = import_benchmark("report_screenshot")
check_screenshot = _shot.check_screenshot
find_chromium = _shot.find_chromium
render_demo_report = _shot.render_demo_report
screenshot = _shot.screenshot

pytestmark = pytest.mark.e2e


def test_the_report_renders_in_headless_chromium_with_its_tables_and_plots(
    tmp_path: Path,
) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "SKIPPED LOUDLY: chromium is not installed, so the report screenshot cannot be "
            "taken; install it with `apt-get install -y chromium` (Debian)."
        )
    html = render_demo_report(tmp_path, "rounds=3")

    png = screenshot(html, tmp_path / "report.png", chromium=chromium)

    assert check_screenshot(png) == []


def test_the_screenshot_check_refuses_a_blank_page(tmp_path: Path) -> None:
    from PIL import Image

    HEIGHT, WIDTH = _shot.HEIGHT, _shot.WIDTH

    blank = tmp_path / "blank.png"
    Image.new("RGB", (WIDTH, HEIGHT), "white").save(blank)

    problems = check_screenshot(blank)

    assert any("blank" in p for p in problems) and any("table header" in p for p in problems)
