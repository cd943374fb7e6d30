"""The report's figures: one row per cell and seed, written as JSON and CSV, and their
aggregates over seeds (mean and sample standard deviation) that plots and the page read.

Values are JSON scalars; ε = ∞ is the string ``"inf"`` (JSON has no infinity) in both
files, an excluded consent level ``"excluded"``, and a figure a cell does not have
(no audit, no DP-SGD) is ``null`` in JSON and empty in CSV.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence

from pcvr.data.io import write_bytes_atomic, write_json_atomic

__all__ = ["COLUMNS", "METRICS", "write_results", "read_csv_rows", "aggregate", "as_float"]

CONFIG_FIELDS = ("epsilon", "correction", "codec", "dp_noise_multiplier", "min_batch_size")
METRICS = (
    "auc", "ne", "calibration",
    "private_auc", "private_auc_se", "private_ne", "private_ne_se", "private_calibration", "private_calibration_se",
    "private_positive_rate", "private_positive_rate_se",
    "bytes_up_per_round", "bytes_down_per_round", "rounds", "wall_s",
    "dp_sgd_epsilon",
    "audit_bound",
    "attack_norm_auc", "attack_norm_low", "attack_norm_high",
    "attack_direction_auc", "attack_direction_low", "attack_direction_high",
    "attack_positive_count_auc", "attack_positive_count_low", "attack_positive_count_high",
    "attack_least_squares_auc", "attack_least_squares_low", "attack_least_squares_high",
)  # fmt: skip
COLUMNS = (
    "cell", "name", *CONFIG_FIELDS, "seed", "audit",
    *METRICS[:15],
    "rejected", "label_dp_epsilon_standard", "label_dp_epsilon_limited", "label_dp_epsilon_opt_out",
    "dp_sgd_epsilon", "dp_sgd_delta", "train_rows_by_epsilon",
    *METRICS[16:], "audit_passed", "audit_canaries",
)  # fmt: skip


def as_float(value: object) -> float | None:
    """A figure as a float: ``"inf"`` → ∞, null/empty → None."""
    if value is None or value == "":
        return None
    return float(value)


def _csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: "" if row.get(name) is None else row[name] for name in COLUMNS})
    return buffer.getvalue()


def read_csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def write_results(out, document: dict) -> None:
    """``results.json`` (the whole document) and ``results.csv`` (its rows), each atomically."""
    missing = sorted({name for row in document["rows"] for name in COLUMNS if name not in row})
    if missing:
        raise ValueError(f"a cell's row lacks {missing[0]!r}: the cached cell predates this report format")
    write_json_atomic(out / "results.json", document)
    write_bytes_atomic(out / "results.csv", _csv_text(document["rows"]).encode("utf-8"))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None, None
    if any(math.isinf(v) for v in finite):
        return math.inf, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One entry per configuration (cell without its seed): mean and std over its seeds."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    entries = []
    for name, members in groups.items():
        entry: dict = {"name": name, **{k: members[0][k] for k in CONFIG_FIELDS}, "seeds": len(members)}
        entry["audit"] = all(bool(m["audit"]) for m in members)
        entry["mean"], entry["std"] = {}, {}
        for metric in METRICS:
            mean, std = _mean_std([as_float(m.get(metric)) for m in members])
            entry["mean"][metric] = "inf" if mean is not None and math.isinf(mean) else mean
            entry["std"][metric] = std
        entries.append(entry)
    return entries
