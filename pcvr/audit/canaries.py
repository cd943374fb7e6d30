"""Canary records: training rows whose labels are coin flips, independent of their features.

An attack that scores better than chance on a canary can only have learned the
label from what the platform received, never from the features. Canaries go
through the advertiser's own randomized response (the same keyed draw as every
record), so under ε-label-DP no attack can score above e^ε / (1 + e^ε) on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pcvr.data import schema
from pcvr.data.io import read_ipc, write_atomic, write_ipc
from pcvr.protocols.keys import prf_uniforms
from pcvr.protocols.layout import LEDGER_FILE, TRAIN_FILE
from pcvr.protocols.label_dp import flip_prob, randomized_response

__all__ = ["CanarySet", "plant_canaries"]


@dataclass(frozen=True)
class CanarySet:
    """Which rows of a planted training table are canaries, and their true (clean) labels."""

    rows: np.ndarray  # int64 [C], row positions in the planted table
    labels: np.ndarray  # int8 [C], the coin flips
    noisy_labels: np.ndarray  # int8 [C], after randomized response

    def to_json(self) -> dict:
        return {"rows": self.rows.tolist(), "labels": self.labels.tolist(), "noisy_labels": self.noisy_labels.tolist()}

    @classmethod
    def from_json(cls, values: dict) -> "CanarySet":
        return cls(
            rows=np.asarray(values["rows"], dtype=np.int64),
            labels=np.asarray(values["labels"], dtype=np.int8),
            noisy_labels=np.asarray(values["noisy_labels"], dtype=np.int8),
        )


def plant_canaries(
    source: Path,
    out_dir: Path,
    *,
    rows: int,
    canaries: int,
    epsilon: float,
    rr_secret: bytes,
    generator: np.random.Generator,
) -> CanarySet:
    """Write ``out_dir/train.arrow``: ``rows`` rows of ``source`` of which ``canaries`` are canaries.

    The rows are a random sample of the clean room's joined table (kept in their
    order); the canaries among them get a fair-coin label, randomized with ε =
    ``epsilon`` (``math.inf``: no noise) by the advertiser's keyed draw.

    Raises:
        ValueError: ``source`` has fewer than ``rows`` rows, or ``canaries`` > ``rows``.
    """
    table = read_ipc(source)
    if not 1 <= canaries <= rows <= table.num_rows:
        raise ValueError(f"{source}: cannot plant {canaries} canaries in {rows} of its {table.num_rows} rows")
    chosen = np.sort(generator.choice(table.num_rows, size=rows, replace=False))
    table = table.take(pa.array(chosen))
    canary_rows = np.sort(generator.choice(rows, size=canaries, replace=False))
    labels = generator.integers(0, 2, size=canaries).astype(np.int8)
    keys = [table.column(schema.JOIN_KEY)[int(i)].as_py() for i in canary_rows]
    rho = flip_prob(epsilon=epsilon)
    noisy = randomized_response(labels, prf_uniforms(keys, secret=rr_secret), flip_probs=np.full(canaries, rho))

    columns = {name: table.column(name).to_numpy().copy() for name in (schema.NOISY_LABEL, schema.EPSILON, schema.FLIP_PROB)}
    columns[schema.NOISY_LABEL][canary_rows] = noisy
    columns[schema.EPSILON][canary_rows] = epsilon
    columns[schema.FLIP_PROB][canary_rows] = rho
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=table.schema.field(name).type))
    out_dir = Path(out_dir)
    write_atomic(out_dir / TRAIN_FILE, lambda staging: write_ipc(staging, table.schema, table.to_batches()))
    ledger_path = Path(source).parent / LEDGER_FILE
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    ledger["audit"] = {
        "rows": rows,
        "canaries": canaries,
        "canary_epsilon": None if math.isinf(epsilon) else epsilon,
        "note": "canary labels are coin flips; their records were randomized like any other",
    }
    (out_dir / LEDGER_FILE).write_text(json.dumps(ledger, indent=2) + "\n")
    return CanarySet(rows=canary_rows.astype(np.int64), labels=labels, noisy_labels=noisy.astype(np.int8))
