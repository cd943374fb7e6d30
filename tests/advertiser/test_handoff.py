"""Advertiser hand-off: validation, consent, keyed randomized response (pcvr.advertiser.handoff)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcvr.advertiser.handoff import hand_off, read_conversions
from pcvr.advertiser.policy import ConsentPolicy
from pcvr.data import schema
from pcvr.data.io import DataError
from pcvr.protocols.keys import prf_uniforms, pseudonymous_keys
from pcvr.protocols.label_dp import flip_prob

JOIN_SECRET = b"J" * 32
RR_SECRET = b"R" * 32
FORMATS = ("parquet", "csv")


def _conversions(n: int, *, seed: int = 0) -> dict[str, list]:
    """A valid conversions table with all consent levels and conversion types."""
    rng = np.random.default_rng(seed)
    converted = (rng.random(n) < 0.3).astype(int)
    types = rng.choice(schema.CONVERSION_TYPES[1:], n)
    consent = rng.choice(["standard", "limited", "opt_out"], n, p=[0.6, 0.25, 0.15])
    return {
        schema.CLICK_ID: [f"click-{i:05d}" for i in range(n)],
        schema.CONVERTED: converted.tolist(),
        schema.CONVERSION_TYPE: [str(t) if c else "none" for c, t in zip(converted, types)],
        schema.TIMESTAMP: (1_767_225_600 + 37 * np.arange(n)).tolist(),
        schema.CONSENT: [str(c) for c in consent],
    }


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return str(value)


def _write(path: Path, columns: dict[str, list]) -> Path:
    """Write ``columns`` as Parquet (types inferred; None is null) or CSV (None is an empty field)."""
    if path.suffix == ".csv":
        rows = zip(*columns.values())
        lines = [",".join(columns)] + [",".join(_csv_cell(v) for v in row) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.table(columns), path)
    return path


def _hand_off(path: Path, out_dir: Path, *, rr_secret: bytes = RR_SECRET, policy: ConsentPolicy | None = None):
    return hand_off(
        path, out_dir, policy=policy or ConsentPolicy.default(), join_secret=JOIN_SECRET, rr_secret=rr_secret
    )


# --- the happy path -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_hand_off_writes_labels_and_ledger(tmp_path, fmt):
    columns = _conversions(200)
    path = _write(tmp_path / f"conversions.{fmt}", columns)
    ledger = _hand_off(path, tmp_path / "out")
    labels = pq.read_table(tmp_path / "out" / "labels.parquet")
    assert tuple(labels.column_names) == schema.LABEL_COLUMNS
    assert labels.schema.field(schema.JOIN_KEY).type == pa.binary(32)
    assert labels.schema.field(schema.NOISY_LABEL).type == pa.int8()
    kept = [c != "opt_out" for c in columns[schema.CONSENT]]
    assert labels.num_rows == sum(kept)
    assert ledger.records == 200
    stored = json.loads((tmp_path / "out" / "ledger.json").read_text())
    assert stored["records"] == 200 and stored["source"] == str(path)
    assert stored["policy"] == ConsentPolicy.default().to_dict()
    for level in ("standard", "limited", "opt_out"):
        assert stored["levels"][level]["records"] == columns[schema.CONSENT].count(level)
    assert sorted(tmp_path.joinpath("out").iterdir()) == [tmp_path / "out" / "labels.parquet", tmp_path / "out" / "ledger.json"]


def test_noisy_labels_follow_keyed_reference(tmp_path):
    """Slow reference: every kept record's noisy label is y XOR [u < ρ(ε of its level)],
    with u = HMAC(rr_secret, domain ‖ HMAC(join_secret, click_id))."""
    columns = _conversions(300, seed=1)
    path = _write(tmp_path / "conversions.parquet", columns)
    _hand_off(path, tmp_path / "out")
    labels = pq.read_table(tmp_path / "out" / "labels.parquet").to_pydict()
    by_key = {k: (n, e, r) for k, n, e, r in zip(*(labels[c] for c in schema.LABEL_COLUMNS))}
    epsilons = {"standard": 3.0, "limited": 1.0}
    checked = 0
    for click_id, label, level in zip(columns[schema.CLICK_ID], columns[schema.CONVERTED], columns[schema.CONSENT]):
        if level == "opt_out":
            continue
        (key,) = pseudonymous_keys([click_id], secret=JOIN_SECRET)
        (uniform,) = prf_uniforms([key], secret=RR_SECRET)
        rho = flip_prob(epsilon=epsilons[level])
        noisy, epsilon, stored_rho = by_key[key]
        assert epsilon == epsilons[level]
        assert stored_rho == rho
        assert noisy == (1 - label if uniform < rho else label)
        checked += 1
    assert checked == len(by_key)


def test_infinite_epsilon_passes_labels_unperturbed(tmp_path):
    columns = _conversions(100, seed=2)
    path = _write(tmp_path / "conversions.parquet", columns)
    policy = ConsentPolicy.from_mapping({"standard": "inf", "limited": "inf", "opt_out": "exclude"})
    _hand_off(path, tmp_path / "out", policy=policy)
    labels = pq.read_table(tmp_path / "out" / "labels.parquet").to_pydict()
    kept = [i for i, c in enumerate(columns[schema.CONSENT]) if c != "opt_out"]
    keys = pseudonymous_keys([columns[schema.CLICK_ID][i] for i in kept], secret=JOIN_SECRET)
    clean = dict(zip(keys, (columns[schema.CONVERTED][i] for i in kept)))
    assert {k: n for k, n in zip(labels[schema.JOIN_KEY], labels[schema.NOISY_LABEL])} == clean
    assert set(labels[schema.FLIP_PROB]) == {0.0}


# --- determinism: each label randomized exactly once -----------------------------------


def test_reruns_give_identical_noisy_labels(tmp_path):
    path = _write(tmp_path / "conversions.parquet", _conversions(500, seed=3))
    _hand_off(path, tmp_path / "run1")
    _hand_off(path, tmp_path / "run2")
    first = pq.read_table(tmp_path / "run1" / "labels.parquet")
    second = pq.read_table(tmp_path / "run2" / "labels.parquet")
    for name in schema.LABEL_COLUMNS:
        assert first.column(name).to_pylist() == second.column(name).to_pylist()
    assert (tmp_path / "run1" / "labels.parquet").read_bytes() == (tmp_path / "run2" / "labels.parquet").read_bytes()


def test_noisy_label_does_not_depend_on_row_order(tmp_path):
    columns = _conversions(500, seed=4)
    order = np.random.default_rng(4).permutation(500)
    shuffled = {name: [values[i] for i in order] for name, values in columns.items()}
    _hand_off(_write(tmp_path / "a.parquet", columns), tmp_path / "a")
    _hand_off(_write(tmp_path / "b.parquet", shuffled), tmp_path / "b")
    a = pq.read_table(tmp_path / "a" / "labels.parquet").to_pydict()
    b = pq.read_table(tmp_path / "b" / "labels.parquet").to_pydict()
    assert dict(zip(a[schema.JOIN_KEY], a[schema.NOISY_LABEL])) == dict(zip(b[schema.JOIN_KEY], b[schema.NOISY_LABEL]))


def test_different_rr_secret_gives_different_flips(tmp_path):
    columns = _conversions(2000, seed=5)
    columns[schema.CONSENT] = ["limited"] * 2000  # ε = 1: ρ ≈ 0.27, so many flips to compare
    path = _write(tmp_path / "conversions.parquet", columns)
    _hand_off(path, tmp_path / "a")
    _hand_off(path, tmp_path / "b", rr_secret=b"another-rr-secret-of-32-bytes!!!")
    a = pq.read_table(tmp_path / "a" / "labels.parquet")
    b = pq.read_table(tmp_path / "b" / "labels.parquet")
    assert a.column(schema.JOIN_KEY).equals(b.column(schema.JOIN_KEY))
    differ = np.asarray(a.column(schema.NOISY_LABEL)) != np.asarray(b.column(schema.NOISY_LABEL))
    # Independent draws disagree with probability 2ρ(1 − ρ) ≈ 0.39.
    assert 0.3 < differ.mean() < 0.5


# --- consent: opt-out never reaches the clean room -------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_opt_out_records_never_reach_the_clean_room(tmp_path, fmt):
    columns = _conversions(400, seed=6)
    opted_out = [c for c, level in zip(columns[schema.CLICK_ID], columns[schema.CONSENT]) if level == "opt_out"]
    assert len(opted_out) > 20
    path = _write(tmp_path / f"conversions.{fmt}", columns)
    ledger = _hand_off(path, tmp_path / "out")

    labels = pq.read_table(tmp_path / "out" / "labels.parquet")
    handed_keys = set(labels.column(schema.JOIN_KEY).to_pylist())
    opted_out_keys = set(pseudonymous_keys(opted_out, secret=JOIN_SECRET))
    assert not handed_keys & opted_out_keys
    kept_ids = [c for c, level in zip(columns[schema.CLICK_ID], columns[schema.CONSENT]) if level != "opt_out"]
    assert handed_keys == set(pseudonymous_keys(kept_ids, secret=JOIN_SECRET))

    assert ledger.excluded == len(opted_out)
    stored = json.loads((tmp_path / "out" / "ledger.json").read_text())
    assert stored["excluded"] == len(opted_out)
    assert stored["levels"]["opt_out"] == {"records": len(opted_out), "epsilon": None, "excluded": True}
    assert stored["levels"]["standard"]["excluded"] is False


def test_labels_file_holds_no_raw_click_id(tmp_path):
    columns = _conversions(100, seed=7)
    path = _write(tmp_path / "conversions.parquet", columns)
    _hand_off(path, tmp_path / "out")
    blob = (tmp_path / "out" / "labels.parquet").read_bytes()
    assert not any(click_id.encode() in blob for click_id in columns[schema.CLICK_ID])
    assert b"click-" not in blob


def test_all_opted_out_hands_off_an_empty_label_table(tmp_path):
    columns = _conversions(10)
    columns[schema.CONSENT] = ["opt_out"] * 10
    ledger = _hand_off(_write(tmp_path / "c.parquet", columns), tmp_path / "out")
    assert pq.read_table(tmp_path / "out" / "labels.parquet").num_rows == 0
    assert ledger.excluded == 10


# --- bad input: one-line DataError naming file, field, row; nothing written ----------


def _drop_consent(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    del columns[schema.CONSENT]
    return schema.CONSENT, None


def _null_label(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][2] = None
    return schema.CONVERTED, 2


def _nan_label(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][2] = math.nan
    # CSV: "NaN" in an integer column reads as a missing value (row named). Parquet: the
    # NaN makes the column float, which is rejected as a whole (field named, no row).
    return schema.CONVERTED, (2 if fmt == "csv" else None)


def _missing_click_id(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CLICK_ID][2] = None  # null in Parquet, an empty field in CSV
    return schema.CLICK_ID, 2


def _duplicate_click_id(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CLICK_ID][3] = columns[schema.CLICK_ID][1]
    return schema.CLICK_ID, 3


def _unknown_consent(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONSENT][2] = "maybe"
    return schema.CONSENT, 2


def _label_two(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][2] = 2
    columns[schema.CONVERSION_TYPE][2] = "purchase"
    return schema.CONVERTED, 2


def _label_negative(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][4] = -1
    columns[schema.CONVERSION_TYPE][4] = "purchase"
    return schema.CONVERTED, 4


def _label_disagrees_with_type(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][2] = 1
    columns[schema.CONVERSION_TYPE][2] = "none"
    return schema.CONVERSION_TYPE, 2


def _type_without_label(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][5] = 0
    columns[schema.CONVERSION_TYPE][5] = "checkout"
    return schema.CONVERTED, 5


def _unknown_conversion_type(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.CONVERTED][2] = 1
    columns[schema.CONVERSION_TYPE][2] = "refund"
    return schema.CONVERSION_TYPE, 2


def _text_timestamp(columns: dict, fmt: str) -> tuple[str | None, int | None]:
    columns[schema.TIMESTAMP] = [str(v) for v in columns[schema.TIMESTAMP]]
    columns[schema.TIMESTAMP][2] = "yesterday"
    return schema.TIMESTAMP, None


BAD_INPUTS = [
    _drop_consent,
    _null_label,
    _nan_label,
    _missing_click_id,
    _duplicate_click_id,
    _unknown_consent,
    _label_two,
    _label_negative,
    _label_disagrees_with_type,
    _type_without_label,
    _unknown_conversion_type,
    _text_timestamp,
]


def _assert_one_line_naming(error: DataError, path: Path, field: str | None, row: int | None) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message
    if field is not None:
        assert field in message
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message


def _assert_nothing_written(out_dir: Path) -> None:
    assert not (out_dir / "labels.parquet").exists()
    assert not (out_dir / "ledger.json").exists()
    if out_dir.exists():
        assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_conversions_raise_one_line_error_and_write_nothing(tmp_path, fmt, corrupt):
    columns = _conversions(12, seed=8)
    columns[schema.CONVERTED][:6] = [0, 1, 0, 0, 1, 1]
    columns[schema.CONVERSION_TYPE][:6] = ["none", "purchase", "none", "none", "add_to_cart", "checkout"]
    field, row = corrupt(columns, fmt)
    path = _write(tmp_path / f"conversions.{fmt}", columns)
    out_dir = tmp_path / "out"
    with pytest.raises(DataError) as excinfo:
        _hand_off(path, out_dir)
    _assert_one_line_naming(excinfo.value, path, field, row)
    _assert_nothing_written(out_dir)
    with pytest.raises(DataError):
        read_conversions(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_without_rows_is_rejected(tmp_path, fmt):
    columns = {name: [] for name in schema.CONVERSION_COLUMNS}
    if fmt == "parquet":
        path = tmp_path / "conversions.parquet"
        table = pa.table({name: pa.array([], type=pa.string()) for name in schema.CONVERSION_COLUMNS})
        pq.write_table(table, path)
    else:
        path = _write(tmp_path / "conversions.csv", columns)
    with pytest.raises(DataError) as excinfo:
        _hand_off(path, tmp_path / "out")
    _assert_one_line_naming(excinfo.value, path, None, None)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_byte_file_is_rejected(tmp_path, fmt):
    path = tmp_path / f"conversions.{fmt}"
    path.write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        _hand_off(path, tmp_path / "out")
    _assert_one_line_naming(excinfo.value, path, None, None)
    _assert_nothing_written(tmp_path / "out")


def test_missing_file_is_rejected(tmp_path):
    path = tmp_path / "absent.parquet"
    with pytest.raises(DataError) as excinfo:
        _hand_off(path, tmp_path / "out")
    _assert_one_line_naming(excinfo.value, path, None, None)
    _assert_nothing_written(tmp_path / "out")


def test_failed_hand_off_keeps_previous_output(tmp_path):
    good = _write(tmp_path / "good.parquet", _conversions(50))
    _hand_off(good, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad_columns = _conversions(50)
    bad_columns[schema.CONSENT][7] = "unsure"
    bad = _write(tmp_path / "bad.parquet", bad_columns)
    with pytest.raises(DataError):
        _hand_off(bad, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
