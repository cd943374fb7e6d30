"""What ingesting a user's files costs: export → hand-off → join, streamed, at N rows.

Writes an N-row click log (CSV or Parquet, string categorical columns, dense columns
with missing values) and a conversions file in the advertiser's own words, plus a
small pretraining file and the spec reading them; pretrains a tiny backbone (setup,
reported apart), then runs the three party steps exactly as the ``pcvr`` commands do:

    export     pcvr.platform.features.export_features      click log → encoded features (Arrow IPC)
    hand_off   pcvr.advertiser.handoff.hand_off            conversions → noisy labels + ledger
    join       pcvr.clean_room.dataset.join_inputs         features ⋈ labels → train/eval (Arrow IPC)

Each step runs in a fresh subprocess, so its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. Target: every step's
peak RSS ≤ 2 GB at 10M rows.

    python benchmarks/ingest.py [--rows 10000000] [--format parquet|csv] [--work-dir DIR]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

STEPS = ("setup", "export", "hand_off", "join")
JOIN_SECRET = b"j" * 32
RR_SECRET = b"r" * 32
HOLDOUT_KEY = b"h" * 32
_WRITE_ROWS = 1_000_000
_PRETRAIN_ROWS = 20_000

SPEC = """[features]
path = "clicks.{suffix}"
format = "{fmt}"
click_id = "click"
default_buckets = 100000

[[features.categorical]]
column = "user"
buckets = 1000000

[[features.categorical]]
column = "ad"

[[features.categorical]]
column = "site"
buckets = 1000

[[features.dense]]
column = "price"
transform = "log1p"
missing = "zero"

[[features.dense]]
column = "age"
transform = "standardize"
missing = "mean"

[[features.dense]]
column = "hour"

[pretrain]
path = "pretrain.{suffix}"
format = "{fmt}"
label = "clicked"
positive = ["1"]
negative = ["0"]

[conversions]
path = "conversions.{suffix}"
format = "{fmt}"
click_id = "click"
label = "purchased"
positive = ["yes"]
negative = ["no"]
consent = "consent_given"
consent_levels = {{ full = "standard", partial = "limited", withdrawn = "opt_out" }}
"""


def _click_chunk(rng: np.random.Generator, start: int, n: int, *, labelled: bool) -> pa.Table:
    ids = np.arange(start, start + n)
    price = rng.lognormal(2.0, 1.0, n)
    price[rng.random(n) < 0.01] = np.nan  # missing, filled with 0 by the spec
    columns = {
        "click": pa.array(np.char.add("clk-", ids.astype(str))),
        "user": pa.array(np.char.add("user-", rng.integers(0, 2_000_000, n).astype(str))),
        "ad": pa.array(np.char.add("ad-", rng.integers(0, 50_000, n).astype(str))),
        "site": pa.array(np.char.add("site.example/", rng.integers(0, 500, n).astype(str))),
        "price": pa.array(price),
        "age": pa.array(rng.normal(40, 12, n).round(1)),
        "hour": pa.array(rng.integers(0, 24, n).astype(np.float64)),
    }
    if labelled:
        columns["clicked"] = pa.array((rng.random(n) < 0.1).astype(np.int64))
    return pa.table(columns)


def _conversion_chunk(rng: np.random.Generator, start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    return pa.table(
        {
            "click": pa.array(np.char.add("clk-", ids.astype(str))),
            "purchased": pa.array(np.where(rng.random(n) < 0.03, "yes", "no")),
            "consent_given": pa.array(np.array(["full", "partial", "withdrawn"])[rng.choice(3, n, p=[0.85, 0.1, 0.05])]),
        }
    )


def _write(path: Path, chunks, fmt: str) -> None:
    writer = None
    try:
        for table in chunks:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema) if fmt == "parquet" else pacsv.CSVWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def write_inputs(work: Path, *, rows: int, fmt: str, seed: int = 0) -> Path:
    """The click log, conversions, pretraining data and spec under ``work``; returns the spec's path."""
    suffix = "parquet" if fmt == "parquet" else "csv"
    rng = np.random.default_rng(seed)
    spans = [(s, min(_WRITE_ROWS, rows - s)) for s in range(0, rows, _WRITE_ROWS)]
    _write(work / f"clicks.{suffix}", (_click_chunk(rng, s, n, labelled=False) for s, n in spans), fmt)
    _write(work / f"conversions.{suffix}", (_conversion_chunk(rng, s, n) for s, n in spans), fmt)
    _write(work / f"pretrain.{suffix}", [_click_chunk(rng, 10**12, min(rows, _PRETRAIN_ROWS), labelled=True)], fmt)
    spec = work / "spec.toml"
    spec.write_text(SPEC.format(suffix=suffix, fmt=fmt))
    return spec


def run_step(step: str, work: Path) -> dict:
    """Run one step in this process; returns its rows, seconds and peak RSS."""
    import torch

    from pcvr.advertiser.handoff import hand_off
    from pcvr.advertiser.policy import ConsentPolicy
    from pcvr.clean_room.dataset import join_inputs
    from pcvr.data.spec import DatasetSpec
    from pcvr.models.cvr import ModelShape
    from pcvr.platform.features import export_features
    from pcvr.platform.pretrain import pretrain_from_spec

    spec = DatasetSpec.load(work / "spec.toml")
    started = time.perf_counter()
    if step == "setup":
        shape = ModelShape(embedding_dim=4, mlp_dims=(16,))
        pretrain_from_spec(spec, work / "backbone", shape=shape, epochs=1, generator=torch.Generator().manual_seed(0))
        rows = _PRETRAIN_ROWS
    elif step == "export":
        rows = export_features(spec, backbone_dir=work / "backbone", join_secret=JOIN_SECRET, out_path=work / "features.arrow")
    elif step == "hand_off":
        ledger = hand_off(spec, policy=ConsentPolicy.default(), join_secret=JOIN_SECRET, rr_secret=RR_SECRET, out_dir=work / "handoff")
        rows = ledger.records
    elif step == "join":
        summary = join_inputs(
            work / "features.arrow",
            work / "handoff" / "labels.arrow",
            train_path=work / "clean_room" / "train.arrow",
            eval_path=work / "clean_room" / "eval.arrow",
            holdout_key=HOLDOUT_KEY,
        )
        rows = summary.rows + summary.eval_rows + summary.features_without_label
    else:
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"rows": int(rows), "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds), "peak_rss_mb": round(peak_mb, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept afterwards; default: a temporary directory")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per step")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    if args.step is not None:
        print(json.dumps(run_step(args.step, args.work_dir)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="pcvr-ingest-")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        write_inputs(work, rows=args.rows, fmt=args.format)
        write_seconds = time.perf_counter() - started
        steps = {}
        for step in STEPS:
            done = subprocess.run(
                [sys.executable, __file__, "--step", step, "--work-dir", str(work)],
                capture_output=True, text=True, timeout=args.timeout, check=False,
            )
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"step {step} failed (exit {done.returncode})")
            steps[step] = json.loads(done.stdout.strip().splitlines()[-1])
        sizes = {name: (work / name).stat().st_size for name in ("features.arrow", "handoff/labels.arrow", "clean_room/train.arrow")}
        measured = [steps[s] for s in STEPS if s != "setup"]
        print(
            json.dumps(
                {
                    "benchmark": "ingest",
                    "rows": args.rows,
                    "format": args.format,
                    "write_inputs_s": round(write_seconds, 1),
                    "steps": steps,
                    "peak_rss_mb": max(s["peak_rss_mb"] for s in measured),
                    "target_peak_rss_mb": 2048,
                    "bytes": sizes,
                }
            )
        )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
