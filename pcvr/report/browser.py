"""Open the report page in headless Chromium: screenshot it and read its own check from the DOM.

The page (:mod:`pcvr.report.page`) writes into ``#page-check`` how many of its images
decoded and how many script errors it saw; Chromium's ``--dump-dom`` prints the DOM
after the load event, so a page whose check never ran (a script error before it, or
no load) reads as failed too. Nothing is fetched from the network: the page is
self-contained and Chromium runs with background networking off and a fresh profile.

    python -m pcvr.report.browser OUT/index.html --screenshot OUT/screenshot.png
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PageCheck", "check_page", "find_chromium", "CHROMIUM"]

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
_CHECK = re.compile(r'<p id="page-check"([^>]*)>([^<]*)</p>')
_ATTRIBUTE = re.compile(r'data-([a-z-]+)="(\d+)"')


@dataclass(frozen=True)
class PageCheck:
    """What the page reported about itself once loaded."""

    images: int
    loaded: int
    script_errors: int
    text: str

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.loaded == self.images and self.script_errors == 0


def find_chromium() -> Path | None:
    if CHROMIUM.exists():
        return CHROMIUM
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return None if found is None else Path(found)


def _run(chromium: Path, profile: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(chromium), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def check_page(page: Path, *, screenshot: Path | None = None, chromium: Path | None = None, timeout_s: float = 60.0) -> PageCheck:
    """Load ``page`` in headless Chromium, optionally screenshot it, and return its own check.

    Raises:
        FileNotFoundError: no Chromium (install Debian's ``chromium``) or no page.
        RuntimeError: Chromium failed, or the page never wrote its check.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"{CHROMIUM}: no Chromium; install it with `apt-get install -y chromium`")
    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such page")
    url = page.as_uri()
    with tempfile.TemporaryDirectory(prefix="pcvr-chromium-") as profile:
        dump = _run(chromium, Path(profile) / "dom", "--virtual-time-budget=10000", "--dump-dom", url, timeout_s=timeout_s)
        if screenshot is not None:
            screenshot = Path(screenshot).resolve()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = _run(
                chromium, Path(profile) / "shot", "--window-size=1200,2400", f"--screenshot={screenshot}", url, timeout_s=timeout_s
            )
            if shot.returncode != 0 or not screenshot.is_file():
                raise RuntimeError(f"{page}: chromium could not screenshot it: {shot.stderr.strip()[-300:]}")
    if dump.returncode != 0:
        raise RuntimeError(f"{page}: chromium exited {dump.returncode}: {dump.stderr.strip()[-300:]}")
    match = _CHECK.search(dump.stdout)
    if match is None:
        return PageCheck(images=0, loaded=0, script_errors=0, text="the page has no #page-check")
    attributes = {name: int(value) for name, value in _ATTRIBUTE.findall(match[1])}
    if "images" not in attributes:  # the check never ran: a script error stopped it, or the page never loaded
        return PageCheck(images=0, loaded=0, script_errors=attributes.get("script-errors", 1), text=match[2])
    return PageCheck(attributes["images"], attributes["loaded"], attributes.get("script-errors", 0), match[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcvr.report.browser", description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        result = check_page(args.page, screenshot=args.screenshot)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"pcvr: error: {error}", file=sys.stderr)
        return 2
    print(f"{result.text}" + ("" if args.screenshot is None else f"; screenshot {args.screenshot}"))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
