"""The report page in headless Chromium: every image decodes, no script error; broken pages fail."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image

from pcvr.report.browser import check_page


def test_report_page_loads_every_image_and_is_screenshotted(tiny_report) -> None:
    out, results = tiny_report
    check = check_page(out / "index.html", screenshot=out / "screenshot.png")
    assert check.ok, check.text
    assert check.images == len(results["plots"]) and check.script_errors == 0
    height, width, _ = matplotlib.image.imread(out / "screenshot.png").shape
    assert (width, height) == (1200, 2400)


def _variant(out: Path, name: str, change) -> Path:
    path = out.parent / name
    path.write_text(change((out / "index.html").read_text(encoding="utf-8")), encoding="utf-8")
    return path


def test_control_a_broken_image_fails(tiny_report) -> None:
    out, _ = tiny_report
    broken = _variant(out, "broken_image.html", lambda page: re.sub(r'src="data:image/png;base64,[^"]+"', 'src="data:image/png;base64,AAAA"', page, count=1))
    check = check_page(broken)
    assert not check.ok and check.loaded == check.images - 1, check.text


def test_control_a_script_error_fails(tiny_report) -> None:
    out, _ = tiny_report
    scripted = _variant(out, "script_error.html", lambda page: page.replace("<body>", "<body><script>null.field = 1;</script>", 1))
    check = check_page(scripted)
    assert not check.ok and check.script_errors == 1, check.text


def test_control_a_page_whose_check_never_runs_fails(tiny_report) -> None:
    out, _ = tiny_report
    silent = _variant(out, "no_check.html", lambda page: page.replace('window.addEventListener("load"', 'window.addEventListener("never"', 1))
    assert not check_page(silent).ok
