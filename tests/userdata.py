"""Small files as a user of pcvr would bring them: a CSV click log with string categoricals, a
pretraining file, a conversions file in the advertiser's own words, and the spec describing them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pcvr.data.spec import DatasetSpec

CATEGORICAL = ("user", "ad", "site")
DENSE = ("price", "age")
SPEC = """[features]
path = "{features}"
format = "{fmt}"
click_id = "click"
default_buckets = 50
chunk_rows = {chunk_rows}

[[features.categorical]]
column = "user"
buckets = 200

[[features.categorical]]
column = "ad"

[[features.categorical]]
column = "site"
missing = "error"

[[features.dense]]
column = "price"
transform = "log1p"
missing = "zero"

[[features.dense]]
column = "age"
transform = "standardize"
missing = "mean"

[pretrain]
path = "{pretrain}"
format = "{fmt}"
label = "clicked"
positive = ["1"]
negative = ["0"]

[conversions]
path = "{conversions}"
format = "csv"
click_id = "click"
label = "purchased"
positive = ["yes"]
negative = ["no"]
consent = "consent_given"
consent_levels = {{ full = "standard", partial = "limited", withdrawn = "opt_out" }}
"""


def click_log(n: int, *, seed: int, prefix: str = "c", with_label: bool = False) -> dict[str, list]:
    """Rows whose label depends on the user and the price, so a model has something to learn."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 150, n)
    price = rng.lognormal(2.0, 1.0, n)
    columns: dict[str, list] = {
        "click": [f"{prefix}{i}" for i in range(n)],
        "user": [f"u{u}" for u in users],
        "ad": [f"ad-{a}" for a in rng.integers(0, 40, n)],
        "site": [f"s{s}" for s in rng.integers(0, 5, n)],
        "price": price.round(3).tolist(),
        "age": rng.normal(40, 12, n).round(1).tolist(),
    }
    if with_label:
        logit = -1.0 + 1.5 * (users % 3 == 0) - 0.3 * np.log1p(price)
        columns["clicked"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int).tolist()
    return columns


def conversions(click_ids: list[str], *, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        "click": list(click_ids),
        "purchased": ["yes" if p else "no" for p in rng.random(len(click_ids)) < 0.2],
        "consent_given": rng.choice(["full", "partial", "withdrawn"], len(click_ids), p=[0.7, 0.2, 0.1]).tolist(),
    }


def write_table(columns: dict[str, list], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def write_user_files(directory: Path, *, rows: int = 300, fmt: str = "csv", chunk_rows: int = 64, seed: int = 0) -> DatasetSpec:
    """A click log, pretraining data and conversions under ``directory``, and the spec that reads them."""
    directory = Path(directory)
    suffix = "csv" if fmt == "csv" else "parquet"
    log = click_log(rows, seed=seed)
    write_table(log, directory / f"clicks.{suffix}")
    write_table(click_log(2 * rows, seed=seed + 1, prefix="p", with_label=True), directory / f"pretrain.{suffix}")
    write_table(conversions(log["click"], seed=seed + 2), directory / "conversions.csv")
    text = SPEC.format(
        features=f"clicks.{suffix}", pretrain=f"pretrain.{suffix}", conversions="conversions.csv", fmt=fmt, chunk_rows=chunk_rows
    )
    (directory / "spec.toml").write_text(text)
    return DatasetSpec.load(directory / "spec.toml")
