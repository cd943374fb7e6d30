"""The platform's feature logs: encoding with the backbone's encoding, and export to a clean room.

What leaves for a clean room is the pseudonymous join key (HMAC of the click id
under the key agreed with that advertiser) and the *encoded* features (hashed
bucket indices, dense values) — never a raw click, user or ad id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pcvr.data import schema
from pcvr.data.encoding import FeatureEncoding, feature_roles, labelled_chunks
from pcvr.data.io import DataError, staged, write_ipc
from pcvr.data.readers import DuplicateKeys, Role, RowIndex, click_ids, iter_chunks, key_bytes, label_values
from pcvr.data.spec import CRITEO_ROW, DatasetSpec, FeatureSpec, Format, LabelSpec
from pcvr.models.features import EncodedFeatures, cat_column, dense_column
from pcvr.protocols.keys import pseudonymous_keys

__all__ = ["export_features", "read_labelled", "encoded_schema"]


def encoded_schema(encoding: FeatureEncoding) -> pa.Schema:
    """Columns of an exported feature file: the join key, then ``cat_i`` int32 and ``dense_j`` float32."""
    fields = [pa.field(schema.JOIN_KEY, pa.binary(32))]
    fields += [pa.field(cat_column(i), pa.int32()) for i in range(len(encoding.categorical))]
    fields += [pa.field(dense_column(j), pa.float32()) for j in range(encoding.num_dense)]
    return pa.schema(fields)


def export_features(spec: DatasetSpec, *, backbone_dir: Path, join_secret: bytes, out_path: Path) -> int:
    """Write the clean room's feature input: join key + encoded features, as an Arrow IPC file; returns its rows.

    Streams [features] one chunk at a time; the spec's feature columns must be the
    ones the backbone was pretrained with (its ``encoding.json``). Duplicate click
    ids are found across chunks by :class:`pcvr.data.readers.DuplicateKeys`.
    Nothing is written unless the whole log validates.

    Raises:
        ValueError: the spec has no [features] section.
        DataError: a spec that does not match the backbone, or bad input (naming file, row, column).
    """
    features: FeatureSpec = spec.require("features")
    encoding = FeatureEncoding.load(backbone_dir)
    encoding.check(spec, backbone_dir=Path(backbone_dir))
    roles = feature_roles(features)
    if not (features.format is Format.CRITEO_TSV and features.click_id == CRITEO_ROW):
        roles = {features.click_id: Role.CLICK_ID, **roles}
    duplicates, rows = DuplicateKeys(), RowIndex()

    def batches() -> Iterator[pa.RecordBatch]:
        for chunk in iter_chunks(features.paths, fmt=features.format, columns=roles, chunk_rows=features.chunk_rows):
            keys = pa.array(pseudonymous_keys(click_ids(chunk, features.click_id, features.format), secret=join_secret), type=pa.binary(32))
            duplicates.add(key_bytes(keys, path=chunk.path, start=chunk.start))
            rows.add(chunk)
            yield pa.record_batch({schema.JOIN_KEY: keys, **encoding.encode(chunk)}, schema=encoded_schema(encoding))

    with staged(out_path) as (staging,):
        written = write_ipc(staging, encoded_schema(encoding), batches())
        repeat = duplicates.first_repeat()
        if repeat is not None:
            (path, row), (earlier_path, earlier) = rows.locate(repeat[0]), rows.locate(repeat[1])
            raise DataError(
                f"{path}: row {row}: column {features.click_id!r} repeats the click id of {earlier_path} row {earlier}"
            )
    return written


def read_labelled(
    spec: DatasetSpec, encoding: FeatureEncoding, *, truth_column: str | None = None
) -> tuple[EncodedFeatures, np.ndarray, np.ndarray | None]:
    """Encoded features, binary labels (int8) and, if asked, a numeric ``truth_column`` of the spec's [pretrain] rows.

    The labelled set is held in memory encoded (4 bytes per column per row); raw
    rows are streamed. Used for the platform's pretraining data and, in a
    simulation, for the holdout whose true labels the synthetic world knows.

    Raises:
        DataError: bad input, or a label column holding a single class.
    """
    features: FeatureSpec = spec.require("features")
    section: LabelSpec = spec.require("pretrain")
    encoding.check(spec)
    encoded: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    extra = (truth_column,) if truth_column is not None else ()
    for chunk in labelled_chunks(section, features, extra=extra):
        encoded.append(encoding.encode(chunk))
        labels.append(label_values(chunk, section.label, positive=section.positive, negative=section.negative))
        if truth_column is not None:
            truth.append(chunk.table.column(truth_column).to_numpy(zero_copy_only=False).astype(np.float64))
    label = np.concatenate(labels)
    if label.min() == label.max():
        raise DataError(f"{section.paths[0]}: column {section.label!r} holds a single class; AUC is undefined")
    columns = {name: np.concatenate([part[name] for part in encoded]) for name in encoded[0]}
    return EncodedFeatures.from_columns(columns), label, (np.concatenate(truth) if truth else None)
