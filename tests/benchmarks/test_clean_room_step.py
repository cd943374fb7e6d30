"""benchmarks/clean_room_step.py runs and prints one JSON line of positive rates."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "clean_room_step.py"


def test_prints_one_json_line_with_both_rates():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "4096", "--batch-size", "1024", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["benchmark"] == "clean_room_step" and figures["batch_size"] == 1024
    assert figures["clean_room_rows_per_s"] > 0 and figures["plain_torch_rows_per_s"] > 0
    assert abs(figures["ratio"] - figures["clean_room_rows_per_s"] / figures["plain_torch_rows_per_s"]) < 1e-2
