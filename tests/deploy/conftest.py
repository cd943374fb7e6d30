"""One small prepared work directory for every deployment test (real processes read it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcvr.cli import main


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("deploy") / "work"
    assert main(["prepare", "--rows", "30000", "--advertisers", "3", "--work-dir", str(work)]) == 0
    return work
