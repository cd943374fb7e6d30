"""Turn the advertiser's conversions into the clean room's label input.

For each record: drop it if its consent level is excluded; replace the click id
by its pseudonymous join key; apply binary randomized response at the level's ε
with a keyed draw (exactly once per record); keep ε and ρ beside the noisy
label so the clean room can de-bias. A ledger records what was applied to whom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pcvr.advertiser.policy import ConsentPolicy
from pcvr.data import schema
from pcvr.data.io import DataError, Kind, read_table, require_unique, require_values_in, write_json_atomic, write_parquet_atomic
from pcvr.protocols.keys import prf_uniforms, pseudonymous_keys
from pcvr.protocols.label_dp import flip_prob, randomized_response

__all__ = ["CONVERSION_KINDS", "Ledger", "read_conversions", "randomize_labels", "hand_off"]

CONVERSION_KINDS = {
    schema.CLICK_ID: Kind.STRING,
    schema.CONVERTED: Kind.INTEGER,
    schema.CONVERSION_TYPE: Kind.STRING,
    schema.TIMESTAMP: Kind.INTEGER,
    schema.CONSENT: Kind.STRING,
}


@dataclass(frozen=True)
class Ledger:
    """What the hand-off applied: per consent level, record count, ε and whether excluded."""

    source: str
    records: int
    levels: dict[str, dict]
    mechanism: str = "binary randomized response; one keyed HMAC-SHA256 draw per record"

    @property
    def excluded(self) -> int:
        return sum(entry["records"] for entry in self.levels.values() if entry["excluded"])

    def to_dict(self) -> dict:
        return {"source": self.source, "records": self.records, "excluded": self.excluded, "levels": self.levels, "mechanism": self.mechanism}


def read_conversions(path: Path) -> pa.Table:
    """Read and validate an advertiser conversion file (Parquet or CSV)."""
    table = read_table(path, columns=CONVERSION_KINDS)
    require_unique(table, schema.CLICK_ID, path=path)
    require_values_in(table, schema.CONVERTED, (0, 1), path=path)
    require_values_in(table, schema.CONVERSION_TYPE, schema.CONVERSION_TYPES, path=path)
    require_values_in(table, schema.CONSENT, tuple(level.value for level in schema.ConsentLevel), path=path)
    converted = table.column(schema.CONVERTED).to_numpy()
    typed = table.column(schema.CONVERSION_TYPE).to_numpy(zero_copy_only=False) != "none"
    mismatch = np.flatnonzero(converted.astype(bool) != typed)
    if mismatch.size:
        raise DataError(
            f"{path}: row {mismatch[0]}: column {schema.CONVERTED!r} disagrees with {schema.CONVERSION_TYPE!r}"
        )
    return table


def randomize_labels(
    table: pa.Table, *, policy: ConsentPolicy, join_secret: bytes, rr_secret: bytes, source: str
) -> tuple[pa.Table, Ledger]:
    """The clean-room label table (join_key, noisy_label, epsilon, flip_prob) and its ledger."""
    consent = table.column(schema.CONSENT).to_numpy(zero_copy_only=False)
    epsilon = np.full(len(consent), np.nan)
    levels = {}
    for level, level_epsilon in policy.epsilons:
        mask = consent == level.value
        levels[level.value] = {
            "records": int(mask.sum()),
            "epsilon": None if level_epsilon is None or math.isinf(level_epsilon) else level_epsilon,
            "excluded": level_epsilon is None,
        }
        if level_epsilon is not None:
            epsilon[mask] = level_epsilon
    kept = ~np.isnan(epsilon)
    click_ids = table.column(schema.CLICK_ID).to_numpy(zero_copy_only=False)[kept]
    keys = pseudonymous_keys(click_ids, secret=join_secret)
    epsilon = epsilon[kept]
    flip_probs = np.array([flip_prob(epsilon=e) for e in epsilon]) if epsilon.size else np.zeros(0)
    labels = table.column(schema.CONVERTED).to_numpy()[kept]
    noisy = randomized_response(labels, prf_uniforms(keys, secret=rr_secret), flip_probs=flip_probs)
    out = pa.table(
        {
            schema.JOIN_KEY: pa.array(keys, type=pa.binary(32)),
            schema.NOISY_LABEL: pa.array(noisy, type=pa.int8()),
            schema.EPSILON: pa.array(epsilon, type=pa.float64()),
            schema.FLIP_PROB: pa.array(flip_probs, type=pa.float64()),
        }
    )
    return out, Ledger(source=source, records=table.num_rows, levels=levels)


def hand_off(
    conversions_path: Path,
    out_dir: Path,
    *,
    policy: ConsentPolicy,
    join_secret: bytes,
    rr_secret: bytes,
) -> Ledger:
    """Validate conversions, randomize, and write ``labels.parquet`` + ``ledger.json`` into ``out_dir``.

    Nothing is written unless the whole input validates.
    """
    table = read_conversions(Path(conversions_path))
    labels, ledger = randomize_labels(
        table, policy=policy, join_secret=join_secret, rr_secret=rr_secret, source=str(conversions_path)
    )
    out_dir = Path(out_dir)
    write_parquet_atomic(labels, out_dir / "labels.parquet")
    write_json_atomic(out_dir / "ledger.json", {**ledger.to_dict(), "policy": policy.to_dict()})
    return ledger
