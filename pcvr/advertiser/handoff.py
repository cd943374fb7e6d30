"""Turn the advertiser's conversions into the clean room's label input.

For each record, read as the spec's [conversions] section says: map its consent
value to a level (or apply the spec's one level); drop it if the level is
excluded; replace the click id by its pseudonymous join key; apply binary
randomized response at the level's ε with a keyed draw (exactly once per
record); keep ε and ρ beside the noisy label so the clean room can de-bias. A
ledger records what was applied to whom.

The file is streamed one chunk at a time; duplicate click ids are found across
chunks by :class:`pcvr.data.readers.DuplicateKeys` (16 bytes per record).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pcvr.advertiser.policy import ConsentPolicy
from pcvr.data import schema
from pcvr.data.io import DataError, staged, write_ipc
from pcvr.data.readers import Chunk, DuplicateKeys, Role, RowIndex, click_ids, first_row, iter_chunks, key_bytes, label_values, map_values, split_keys
from pcvr.data.schema import ConsentLevel
from pcvr.data.spec import CRITEO_ROW, DEFAULT_CHUNK_ROWS, ConversionSpec, DatasetSpec, Format
from pcvr.protocols.keys import prf_uniforms, pseudonymous_keys
from pcvr.protocols.label_dp import flip_prob, randomized_response
from pcvr.protocols.layout import LABELS_FILE, LEDGER_FILE

__all__ = ["LABEL_SCHEMA", "Ledger", "ConversionRows", "iter_conversions", "true_labels", "hand_off"]

LABEL_SCHEMA = pa.schema(
    [
        pa.field(schema.JOIN_KEY, pa.binary(32)),
        pa.field(schema.NOISY_LABEL, pa.int8()),
        pa.field(schema.EPSILON, pa.float64()),
        pa.field(schema.FLIP_PROB, pa.float64()),
    ]
)
_LEVELS = tuple(ConsentLevel)
PRIVATE_EVALUATION = (
    "the clean room's private evaluation releases only de-biased sums over its held-out noisy labels: "
    "post-processing of these epsilon-label-DP labels, so it spends no privacy budget"
)


@dataclass(frozen=True)
class Ledger:
    """What the hand-off applied: per consent level, record count, ε and whether excluded."""

    source: str
    records: int
    levels: dict[str, dict]
    mechanism: str = "binary randomized response; one keyed HMAC-SHA256 draw per record"
    private_evaluation: str = field(default=PRIVATE_EVALUATION)

    @property
    def excluded(self) -> int:
        return sum(entry["records"] for entry in self.levels.values() if entry["excluded"])

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "records": self.records,
            "excluded": self.excluded,
            "levels": self.levels,
            "mechanism": self.mechanism,
            "private_evaluation": self.private_evaluation,
        }


@dataclass(frozen=True)
class ConversionRows:
    """One validated chunk of conversions: join keys (S32), clean labels (int8), consent level index per row."""

    chunk: Chunk
    keys: np.ndarray
    labels: np.ndarray
    levels: np.ndarray  # index into ConsentLevel's members


def _columns(conversions: ConversionSpec) -> dict[str, Role]:
    columns = {conversions.label: Role.VALUE}
    if not (conversions.format is Format.CRITEO_TSV and conversions.click_id == CRITEO_ROW):
        columns = {conversions.click_id: Role.CLICK_ID, **columns}
    if conversions.consent is not None:
        columns[conversions.consent] = Role.VALUE
    if conversions.timestamp is not None:
        columns[conversions.timestamp] = Role.TIMESTAMP
    return columns


def iter_conversions(spec: DatasetSpec, *, join_secret: bytes) -> Iterator[ConversionRows]:
    """Stream the spec's [conversions], validated, with each record's join key, label and consent level.

    Duplicate click ids are reported once the whole file has been read.

    Raises:
        ValueError: the spec has no [conversions] section.
        DataError: missing column, wrong type, a label or consent value outside the spec's map,
            a missing value, a duplicate click id (naming file, row, column).
    """
    conversions: ConversionSpec = spec.require("conversions")
    level_of = {value: _LEVELS.index(level) for value, level in conversions.consent_levels or ()}
    duplicates, rows = DuplicateKeys(), RowIndex()
    chunk_rows = spec.features.chunk_rows if spec.features is not None else DEFAULT_CHUNK_ROWS
    for chunk in iter_chunks(conversions.paths, fmt=conversions.format, columns=_columns(conversions), chunk_rows=chunk_rows):
        ids = click_ids(chunk, conversions.click_id, conversions.format)
        labels = label_values(chunk, conversions.label, positive=conversions.positive, negative=conversions.negative)
        if conversions.consent is not None:
            levels = map_values(chunk, conversions.consent, level_of)
        else:
            levels = np.full(len(chunk), _LEVELS.index(conversions.consent_level), dtype=np.int64)
        if conversions.timestamp is not None:
            stamps = chunk.table.column(conversions.timestamp)
            if stamps.null_count:
                raise chunk.fail(first_row(stamps.is_null()), f"column {conversions.timestamp!r} is missing a value")
        keys = key_bytes(_binary32(pseudonymous_keys(ids, secret=join_secret)), path=chunk.path, start=chunk.start)
        duplicates.add(keys)
        rows.add(chunk)
        yield ConversionRows(chunk=chunk, keys=keys, labels=labels, levels=levels)
    repeat = duplicates.first_repeat()
    if repeat is not None:
        (path, row), (earlier_path, earlier) = rows.locate(repeat[0]), rows.locate(repeat[1])
        raise DataError(f"{path}: row {row}: column {conversions.click_id!r} repeats the click id of {earlier_path} row {earlier}")


def true_labels(spec: DatasetSpec, *, join_secret: bytes) -> dict[bytes, int]:
    """Join key → clean label of every conversion record (only a simulation may look: the labels are the advertiser's)."""
    labels: dict[bytes, int] = {}
    for part in iter_conversions(spec, join_secret=join_secret):
        labels.update(zip(split_keys(part.keys), part.labels.tolist()))
    return labels


def _binary32(keys: list[bytes]) -> pa.Array:
    return pa.array(keys, type=pa.binary(32))


def hand_off(spec: DatasetSpec, *, policy: ConsentPolicy, join_secret: bytes, rr_secret: bytes, out_dir: Path) -> Ledger:
    """Validate the conversions, randomize, and write ``labels.arrow`` + ``ledger.json`` into ``out_dir``.

    Both files appear together once the whole input has validated, or neither does.
    """
    epsilons = [policy.epsilon_for(level) for level in _LEVELS]
    rhos = np.array([0.0 if e is None else flip_prob(epsilon=e) for e in epsilons])
    eps = np.array([np.nan if e is None else e for e in epsilons])
    counts = np.zeros(len(_LEVELS), dtype=np.int64)
    records = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal records
        for part in iter_conversions(spec, join_secret=join_secret):
            counts[:] += np.bincount(part.levels, minlength=len(_LEVELS))
            records += len(part.labels)
            kept = ~np.isnan(eps[part.levels])
            keys = split_keys(part.keys[kept])
            flips = rhos[part.levels[kept]]
            noisy = randomized_response(part.labels[kept], prf_uniforms(keys, secret=rr_secret), flip_probs=flips)
            yield pa.record_batch(
                {
                    schema.JOIN_KEY: _binary32(keys),
                    schema.NOISY_LABEL: pa.array(np.asarray(noisy, dtype=np.int8)),
                    schema.EPSILON: pa.array(eps[part.levels[kept]]),
                    schema.FLIP_PROB: pa.array(flips),
                },
                schema=LABEL_SCHEMA,
            )

    out_dir = Path(out_dir)
    conversions: ConversionSpec = spec.require("conversions")
    with staged(out_dir / LABELS_FILE, out_dir / LEDGER_FILE) as (labels_staging, ledger_staging):
        write_ipc(labels_staging, LABEL_SCHEMA, batches())
        levels = {
            level.value: {
                "records": int(counts[i]),
                "epsilon": None if epsilons[i] is None or math.isinf(epsilons[i]) else epsilons[i],
                "excluded": epsilons[i] is None,
            }
            for i, level in enumerate(_LEVELS)
        }
        ledger = Ledger(source=", ".join(str(p) for p in conversions.paths), records=records, levels=levels)
        ledger_staging.write_text(json.dumps({**ledger.to_dict(), "policy": policy.to_dict()}, indent=2) + "\n")
    return ledger
