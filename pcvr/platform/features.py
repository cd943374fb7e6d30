"""The platform's feature logs: validated reading, encoding, and export to a clean room.

What leaves for a clean room is the pseudonymous join key (HMAC of the click id
under the key agreed with that advertiser) and the *encoded* features (hashed
bucket indices, dense values) — never a raw click, user or ad id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcvr.data import schema
from pcvr.data.io import DataError, Kind, read_table, require_unique, require_values_in, write_parquet_atomic
from pcvr.models.features import EncodedFeatures, encode_features, encode_table
from pcvr.protocols.keys import pseudonymous_keys

__all__ = ["FEATURE_KINDS", "read_features", "read_labelled", "export_for_clean_room"]

FEATURE_KINDS = {
    schema.CLICK_ID: Kind.STRING,
    **{name: Kind.INTEGER for name in schema.CATEGORICAL_FIELDS},
    **{name: Kind.FLOAT for name in schema.DENSE_FIELDS},
    schema.TIMESTAMP: Kind.INTEGER,
}


def read_features(path: Path) -> pa.Table:
    """Read and validate a platform feature log."""
    table = read_table(path, columns=FEATURE_KINDS)
    require_unique(table, schema.CLICK_ID, path=path)
    return table


def read_labelled(path: Path, *, buckets: tuple[int, ...]) -> tuple[EncodedFeatures, np.ndarray, np.ndarray | None]:
    """Encoded features, binary labels and (if present) true probabilities of a labelled set."""
    path = Path(path)
    kinds = {**FEATURE_KINDS, schema.LABEL: Kind.INTEGER}
    table = read_table(path, columns=kinds)
    require_values_in(table, schema.LABEL, (0, 1), path=path)
    if table.num_rows and table.column(schema.LABEL).to_numpy().min() == table.column(schema.LABEL).to_numpy().max():
        raise DataError(f"{path}: column {schema.LABEL!r} holds a single class; AUC is undefined")
    true_prob = None
    if path.suffix != ".csv" and schema.TRUE_PROB in pq.read_schema(path).names:
        true_prob = read_table(path, columns={schema.TRUE_PROB: Kind.FLOAT}).column(schema.TRUE_PROB).to_numpy()
    return encode_features(table, buckets=buckets), table.column(schema.LABEL).to_numpy().astype(np.int8), true_prob


def export_for_clean_room(features_path: Path, out_path: Path, *, join_secret: bytes, buckets: tuple[int, ...]) -> int:
    """Write the clean room's feature input (join key + encoded features); returns its row count."""
    table = read_features(features_path)
    keys = pseudonymous_keys(table.column(schema.CLICK_ID).to_numpy(zero_copy_only=False), secret=join_secret)
    columns = {schema.JOIN_KEY: pa.array(keys, type=pa.binary(32)), **encode_table(table, buckets=buckets)}
    write_parquet_atomic(pa.table(columns), out_path)
    return table.num_rows
