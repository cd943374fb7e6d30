"""benchmarks/ingest.py runs end to end at a tiny size and prints one JSON line of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ingest.py"


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_ingest_benchmark_prints_one_json_line(tmp_path, fmt):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "3000", "--format", fmt, "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["benchmark"] == "ingest" and figures["rows"] == 3000 and figures["format"] == fmt
    for step in ("export", "hand_off", "join"):
        entry = figures["steps"][step]
        assert entry["rows"] == 3000 and entry["rows_per_s"] > 0 and 0 < entry["peak_rss_mb"] <= figures["peak_rss_mb"]
    # The join's outputs hold every labelled, consenting row, in train or eval.
    assert (tmp_path / "work" / "clean_room" / "train.arrow").is_file()
    assert (tmp_path / "work" / "clean_room" / "eval.arrow").is_file()
