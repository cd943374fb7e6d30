"""Tests of pcvr.audit.canaries: coin-flip labels, randomized by the advertiser's keyed draw."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pcvr.audit.canaries import CanarySet, plant_canaries
from pcvr.data import schema
from pcvr.data.io import read_ipc, write_ipc
from pcvr.protocols.keys import prf_uniforms
from pcvr.protocols.label_dp import flip_prob
from pcvr.protocols.layout import TRAIN_FILE

SECRET = b"s" * 32


def write_train(path: Path, rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            schema.JOIN_KEY: pa.array([hashlib.sha256(b"%d" % i).digest() for i in range(rows)], type=pa.binary()),
            "cat_0": pa.array(np.arange(rows, dtype=np.int32)),
            schema.NOISY_LABEL: pa.array((rng.random(rows) < 0.03).astype(np.int8)),
            schema.EPSILON: pa.array(np.full(rows, 3.0)),
            schema.FLIP_PROB: pa.array(np.full(rows, flip_prob(epsilon=3.0)), type=pa.float32()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ipc(path, table.schema, table.to_batches())
    (path.parent / "ledger.json").write_text(json.dumps({"records": rows}))
    return table


def test_planted_table_has_the_canaries_with_randomized_coin_flip_labels(tmp_path: Path) -> None:
    source = tmp_path / "eps=3" / TRAIN_FILE
    write_train(source, 5000)
    canaries = plant_canaries(
        source, tmp_path / "audit", rows=3000, canaries=2000, epsilon=1.0, rr_secret=SECRET, generator=np.random.default_rng(1)
    )
    planted = read_ipc(tmp_path / "audit" / TRAIN_FILE)
    assert planted.num_rows == 3000 and len(canaries.rows) == 2000
    # rows keep the source's order (batches are drawn by position)
    assert np.all(np.diff(planted.column("cat_0").to_numpy()) > 0)
    noisy = planted.column(schema.NOISY_LABEL).to_numpy()[canaries.rows]
    np.testing.assert_array_equal(noisy, canaries.noisy_labels)
    assert abs(canaries.labels.mean() - 0.5) < 4 * math.sqrt(0.25 / 2000)  # fair coins
    # randomized response at ε=1, with the advertiser's keyed draw for each canary's key
    keys = [planted.column(schema.JOIN_KEY)[int(i)].as_py() for i in canaries.rows]
    rho = flip_prob(epsilon=1.0)
    expected = np.where(prf_uniforms(keys, secret=SECRET) < rho, 1 - canaries.labels, canaries.labels)
    np.testing.assert_array_equal(canaries.noisy_labels, expected)
    flipped = (canaries.noisy_labels != canaries.labels).mean()
    assert abs(flipped - rho) < 4 * math.sqrt(rho * (1 - rho) / 2000)
    np.testing.assert_allclose(planted.column(schema.FLIP_PROB).to_numpy()[canaries.rows], rho, rtol=1e-6)
    ledger = json.loads((tmp_path / "audit" / "ledger.json").read_text())
    assert ledger["audit"]["canaries"] == 2000 and ledger["records"] == 5000


def test_without_randomized_response_canaries_keep_their_labels(tmp_path: Path) -> None:
    source = tmp_path / "non_private" / TRAIN_FILE
    write_train(source, 100)
    canaries = plant_canaries(
        source, tmp_path / "audit", rows=100, canaries=100, epsilon=math.inf, rr_secret=SECRET, generator=np.random.default_rng(2)
    )
    np.testing.assert_array_equal(canaries.noisy_labels, canaries.labels)
    assert CanarySet.from_json(json.loads(json.dumps(canaries.to_json()))).labels.tolist() == canaries.labels.tolist()


def test_too_many_canaries_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "x" / TRAIN_FILE
    write_train(source, 10)
    with pytest.raises(ValueError, match="cannot plant 11 canaries in 10 of its 10 rows"):
        plant_canaries(source, tmp_path / "a", rows=10, canaries=11, epsilon=1.0, rr_secret=SECRET, generator=np.random.default_rng(0))
    assert not (tmp_path / "a").exists()
