"""Advertiser hand-off: spec-driven validation, consent, keyed randomized response (pcvr.advertiser.handoff).

The conversions use the advertiser's own words: a ``purchased`` column of yes/no and a
``consent_given`` column of full/partial/withdrawn, mapped to levels by the spec.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcvr.advertiser.handoff import hand_off, iter_conversions, true_labels
from pcvr.advertiser.policy import ConsentPolicy
from pcvr.data import schema
from pcvr.data.io import DataError, read_ipc
from pcvr.data.spec import DatasetSpec
from pcvr.protocols.keys import prf_uniforms, pseudonymous_keys
from pcvr.protocols.label_dp import flip_prob
from pcvr.protocols.layout import LABELS_FILE, LEDGER_FILE

JOIN_SECRET = b"J" * 32
RR_SECRET = b"R" * 32
FORMATS = ("parquet", "csv")
CLICK, LABEL, CONSENT, TS = "click", "purchased", "consent_given", "ts"
LEVEL = {"full": "standard", "partial": "limited", "withdrawn": "opt_out"}
EPSILON = {"full": 3.0, "partial": 1.0}


def _conversions(n: int, *, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    purchased = rng.random(n) < 0.3
    consent = rng.choice(list(LEVEL), n, p=[0.6, 0.25, 0.15])
    return {
        CLICK: [f"click-{i:05d}" for i in range(n)],
        LABEL: ["yes" if p else "no" for p in purchased],
        TS: (1_767_225_600 + 37 * np.arange(n)).tolist(),
        CONSENT: [str(c) for c in consent],
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


def _spec(data: Path, *, chunk_rows: int = 5, extra: str = "", negative: str = 'negative = ["no"]\n') -> DatasetSpec:
    """A spec of ``data`` (its format from the suffix), streamed in chunks of ``chunk_rows``."""
    levels = ", ".join(f'{value} = "{level}"' for value, level in LEVEL.items())
    text = (
        f'[features]\npath = "unused.csv"\nformat = "csv"\nclick_id = "c"\nchunk_rows = {chunk_rows}\n'
        '[[features.dense]]\ncolumn = "x"\n\n'
        f'[conversions]\npath = "{data.name}"\nformat = "{data.suffix[1:]}"\nclick_id = "{CLICK}"\nlabel = "{LABEL}"\n'
        f'positive = ["yes"]\n{negative}consent = "{CONSENT}"\nconsent_levels = {{ {levels} }}\ntimestamp = "{TS}"\n{extra}'
    )
    path = data.with_name(data.stem + ".toml")
    path.write_text(text)
    return DatasetSpec.load(path)


def _hand_off(path: Path, out_dir: Path, *, rr_secret: bytes = RR_SECRET, policy: ConsentPolicy | None = None, **spec):
    return hand_off(
        _spec(path, **spec), policy=policy or ConsentPolicy.default(), join_secret=JOIN_SECRET, rr_secret=rr_secret, out_dir=out_dir
    )


def _labels(out_dir: Path) -> dict[str, list]:
    return read_ipc(out_dir / LABELS_FILE).to_pydict()


# --- the happy path -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_hand_off_writes_labels_and_ledger(tmp_path, fmt):
    columns = _conversions(200)
    path = _write(tmp_path / f"conversions.{fmt}", columns)
    ledger = _hand_off(path, tmp_path / "out")
    labels = read_ipc(tmp_path / "out" / LABELS_FILE)
    assert tuple(labels.column_names) == schema.LABEL_COLUMNS
    assert labels.schema.field(schema.JOIN_KEY).type == pa.binary(32)
    assert labels.schema.field(schema.NOISY_LABEL).type == pa.int8()
    assert labels.num_rows == sum(c != "withdrawn" for c in columns[CONSENT])
    assert ledger.records == 200
    stored = json.loads((tmp_path / "out" / LEDGER_FILE).read_text())
    assert stored["records"] == 200 and stored["source"] == str(path)
    assert stored["policy"] == ConsentPolicy.default().to_dict()
    assert "no privacy budget" in stored["private_evaluation"]
    for value, level in LEVEL.items():
        assert stored["levels"][level]["records"] == columns[CONSENT].count(value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([LABELS_FILE, LEDGER_FILE])


def test_noisy_labels_follow_keyed_reference(tmp_path):
    """Slow reference: every kept record's noisy label is y XOR [u < ρ(ε of its level)],
    with u = HMAC(rr_secret, domain ‖ HMAC(join_secret, click_id))."""
    columns = _conversions(300, seed=1)
    _hand_off(_write(tmp_path / "conversions.parquet", columns), tmp_path / "out", chunk_rows=64)
    labels = _labels(tmp_path / "out")
    by_key = {k: (n, e, r) for k, n, e, r in zip(*(labels[c] for c in schema.LABEL_COLUMNS))}
    checked = 0
    for click_id, purchased, consent in zip(columns[CLICK], columns[LABEL], columns[CONSENT]):
        if consent == "withdrawn":
            continue
        (key,) = pseudonymous_keys([click_id], secret=JOIN_SECRET)
        (uniform,) = prf_uniforms([key], secret=RR_SECRET)
        rho = flip_prob(epsilon=EPSILON[consent])
        label = int(purchased == "yes")
        noisy, epsilon, stored_rho = by_key[key]
        assert epsilon == EPSILON[consent] and stored_rho == rho
        assert noisy == (1 - label if uniform < rho else label)
        checked += 1
    assert checked == len(by_key)


def test_chunk_size_does_not_change_the_output(tmp_path):
    path = _write(tmp_path / "conversions.csv", _conversions(257, seed=9))
    _hand_off(path, tmp_path / "a", chunk_rows=7)
    _hand_off(path, tmp_path / "b", chunk_rows=100_000)
    assert read_ipc(tmp_path / "a" / LABELS_FILE).equals(read_ipc(tmp_path / "b" / LABELS_FILE))


def test_int_labels_in_parquet_match_string_values_in_the_spec(tmp_path):
    columns = _conversions(50, seed=10)
    columns[LABEL] = [1 if v == "yes" else 0 for v in columns[LABEL]]
    path = _write(tmp_path / "conversions.parquet", columns)
    spec_text = _spec(path).source.read_text().replace('positive = ["yes"]', "positive = [1]").replace('negative = ["no"]', "negative = [0]")
    spec_path = tmp_path / "int.toml"
    spec_path.write_text(spec_text)
    truth = true_labels(DatasetSpec.load(spec_path), join_secret=JOIN_SECRET)
    keys = pseudonymous_keys(columns[CLICK], secret=JOIN_SECRET)
    assert truth == dict(zip(keys, columns[LABEL]))


def test_without_negative_values_every_other_value_is_negative(tmp_path):
    columns = _conversions(40, seed=11)
    columns[LABEL] = ["yes" if v == "yes" else f"other-{i}" for i, v in enumerate(columns[LABEL])]
    spec = _spec(_write(tmp_path / "conversions.csv", columns), negative="")
    labels = np.concatenate([part.labels for part in iter_conversions(spec, join_secret=JOIN_SECRET)])
    assert labels.tolist() == [int(v == "yes") for v in columns[LABEL]]


def test_one_consent_level_for_all_rows(tmp_path):
    columns = _conversions(30, seed=12)
    del columns[CONSENT]
    path = _write(tmp_path / "conversions.csv", columns)
    text = _spec(_write(tmp_path / "c2.csv", _conversions(3))).source.read_text()
    text = re.sub(r'consent = .*\nconsent_levels = .*\n', 'consent_level = "limited"\n', text).replace("c2.csv", "conversions.csv")
    (tmp_path / "one.toml").write_text(text)
    ledger = hand_off(DatasetSpec.load(tmp_path / "one.toml"), policy=ConsentPolicy.default(), join_secret=JOIN_SECRET, rr_secret=RR_SECRET, out_dir=tmp_path / "out")
    assert ledger.levels["limited"]["records"] == 30 and ledger.levels["standard"]["records"] == 0
    assert set(_labels(tmp_path / "out")[schema.EPSILON]) == {1.0}


def test_infinite_epsilon_passes_labels_unperturbed(tmp_path):
    columns = _conversions(100, seed=2)
    policy = ConsentPolicy.from_mapping({"standard": "inf", "limited": "inf", "opt_out": "exclude"})
    _hand_off(_write(tmp_path / "conversions.parquet", columns), tmp_path / "out", policy=policy)
    labels = _labels(tmp_path / "out")
    kept = [i for i, c in enumerate(columns[CONSENT]) if c != "withdrawn"]
    keys = pseudonymous_keys([columns[CLICK][i] for i in kept], secret=JOIN_SECRET)
    clean = dict(zip(keys, (int(columns[LABEL][i] == "yes") for i in kept)))
    assert dict(zip(labels[schema.JOIN_KEY], labels[schema.NOISY_LABEL])) == clean
    assert set(labels[schema.FLIP_PROB]) == {0.0}


# --- determinism: each label randomized exactly once -----------------------------------


def test_reruns_give_identical_noisy_labels(tmp_path):
    path = _write(tmp_path / "conversions.parquet", _conversions(500, seed=3))
    _hand_off(path, tmp_path / "run1")
    _hand_off(path, tmp_path / "run2")
    assert (tmp_path / "run1" / LABELS_FILE).read_bytes() == (tmp_path / "run2" / LABELS_FILE).read_bytes()


def test_noisy_label_does_not_depend_on_row_order(tmp_path):
    columns = _conversions(500, seed=4)
    order = np.random.default_rng(4).permutation(500)
    shuffled = {name: [values[i] for i in order] for name, values in columns.items()}
    _hand_off(_write(tmp_path / "a.parquet", columns), tmp_path / "a")
    _hand_off(_write(tmp_path / "b.parquet", shuffled), tmp_path / "b")
    a, b = _labels(tmp_path / "a"), _labels(tmp_path / "b")
    assert dict(zip(a[schema.JOIN_KEY], a[schema.NOISY_LABEL])) == dict(zip(b[schema.JOIN_KEY], b[schema.NOISY_LABEL]))


def test_different_rr_secret_gives_different_flips(tmp_path):
    columns = _conversions(2000, seed=5)
    columns[CONSENT] = ["partial"] * 2000  # ε = 1: ρ ≈ 0.27, so many flips to compare
    path = _write(tmp_path / "conversions.parquet", columns)
    _hand_off(path, tmp_path / "a", chunk_rows=512)
    _hand_off(path, tmp_path / "b", rr_secret=b"another-rr-secret-of-32-bytes!!!", chunk_rows=512)
    a, b = read_ipc(tmp_path / "a" / LABELS_FILE), read_ipc(tmp_path / "b" / LABELS_FILE)
    assert a.column(schema.JOIN_KEY).equals(b.column(schema.JOIN_KEY))
    differ = np.asarray(a.column(schema.NOISY_LABEL)) != np.asarray(b.column(schema.NOISY_LABEL))
    # Independent draws disagree with probability 2ρ(1 − ρ) ≈ 0.39.
    assert 0.3 < differ.mean() < 0.5


# --- consent: opt-out never reaches the clean room -------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_opt_out_records_never_reach_the_clean_room(tmp_path, fmt):
    columns = _conversions(400, seed=6)
    opted_out = [c for c, level in zip(columns[CLICK], columns[CONSENT]) if level == "withdrawn"]
    assert len(opted_out) > 20
    ledger = _hand_off(_write(tmp_path / f"conversions.{fmt}", columns), tmp_path / "out", chunk_rows=64)
    handed_keys = set(_labels(tmp_path / "out")[schema.JOIN_KEY])
    assert not handed_keys & set(pseudonymous_keys(opted_out, secret=JOIN_SECRET))
    kept_ids = [c for c, level in zip(columns[CLICK], columns[CONSENT]) if level != "withdrawn"]
    assert handed_keys == set(pseudonymous_keys(kept_ids, secret=JOIN_SECRET))
    assert ledger.excluded == len(opted_out)
    stored = json.loads((tmp_path / "out" / LEDGER_FILE).read_text())
    assert stored["excluded"] == len(opted_out)
    assert stored["levels"]["opt_out"] == {"records": len(opted_out), "epsilon": None, "excluded": True}
    assert stored["levels"]["standard"]["excluded"] is False


def test_labels_file_holds_no_raw_click_id(tmp_path):
    columns = _conversions(100, seed=7)
    _hand_off(_write(tmp_path / "conversions.parquet", columns), tmp_path / "out")
    blob = (tmp_path / "out" / LABELS_FILE).read_bytes()
    assert b"click-" not in blob


def test_all_opted_out_hands_off_an_empty_label_table(tmp_path):
    columns = _conversions(10)
    columns[CONSENT] = ["withdrawn"] * 10
    ledger = _hand_off(_write(tmp_path / "c.parquet", columns), tmp_path / "out")
    assert read_ipc(tmp_path / "out" / LABELS_FILE).num_rows == 0
    assert ledger.excluded == 10


# --- bad input: one-line DataError naming file, field, row; nothing written ----------


def _drop_consent(columns: dict, fmt: str):
    del columns[CONSENT]
    return CONSENT, None


def _null_label(columns: dict, fmt: str):
    columns[LABEL][7] = None
    return LABEL, 7


def _missing_click_id(columns: dict, fmt: str):
    columns[CLICK][6] = None  # null in Parquet, an empty field in CSV
    return CLICK, 6


def _duplicate_click_id_in_one_chunk(columns: dict, fmt: str):
    columns[CLICK][3] = columns[CLICK][1]
    return CLICK, 3


def _duplicate_click_id_across_chunks(columns: dict, fmt: str):
    columns[CLICK][11] = columns[CLICK][2]  # chunks of 5 rows: rows 2 and 11 are in different chunks
    return CLICK, 11


def _unknown_consent(columns: dict, fmt: str):
    columns[CONSENT][8] = "maybe"
    return CONSENT, 8


def _consent_level_name_is_not_a_value(columns: dict, fmt: str):
    columns[CONSENT][2] = "standard"  # a level, but not one of this advertiser's words
    return CONSENT, 2


def _label_outside_the_map(columns: dict, fmt: str):
    columns[LABEL][9] = "maybe"
    return LABEL, 9


def _label_wrong_type(columns: dict, fmt: str):
    columns[LABEL] = [0.5] * len(columns[LABEL])  # a float label: its string form is ambiguous
    return LABEL, (None if fmt == "parquet" else 0)


def _text_timestamp(columns: dict, fmt: str):
    columns[TS] = [str(v) for v in columns[TS]]
    columns[TS][7] = "yesterday"
    return TS, (7 if fmt == "csv" else None)


def _null_timestamp(columns: dict, fmt: str):
    columns[TS][10] = None
    return TS, 10


BAD_INPUTS = [
    _drop_consent,
    _null_label,
    _missing_click_id,
    _duplicate_click_id_in_one_chunk,
    _duplicate_click_id_across_chunks,
    _unknown_consent,
    _consent_level_name_is_not_a_value,
    _label_outside_the_map,
    _label_wrong_type,
    _text_timestamp,
    _null_timestamp,
]


def _assert_one_line_naming(error: DataError, path: Path, field: str | None, row: int | None) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message, message
    if field is not None:
        assert repr(field) in message, message
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message


def _assert_nothing_written(out_dir: Path) -> None:
    assert not (out_dir / LABELS_FILE).exists()
    assert not (out_dir / LEDGER_FILE).exists()
    if out_dir.exists():
        assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_conversions_raise_one_line_error_and_write_nothing(tmp_path, fmt, corrupt):
    columns = _conversions(14, seed=8)
    field, row = corrupt(columns, fmt)
    path = _write(tmp_path / f"conversions.{fmt}", columns)
    out_dir = tmp_path / "out"
    with pytest.raises(DataError) as excinfo:
        _hand_off(path, out_dir)
    _assert_one_line_naming(excinfo.value, path, field, row)
    _assert_nothing_written(out_dir)


def test_unknown_consent_names_the_values_the_spec_maps(tmp_path):
    columns = _conversions(14, seed=8)
    columns[CONSENT][4] = "unsure"
    with pytest.raises(DataError, match=r"'unsure'; expected one of 'full', 'partial', 'withdrawn'"):
        _hand_off(_write(tmp_path / "c.csv", columns), tmp_path / "out")


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_without_rows_is_rejected(tmp_path, fmt):
    if fmt == "parquet":
        path = tmp_path / "conversions.parquet"
        pq.write_table(pa.table({name: pa.array([], type=pa.string()) for name in (CLICK, LABEL, TS, CONSENT)}), path)
    else:
        path = _write(tmp_path / "conversions.csv", {name: [] for name in (CLICK, LABEL, TS, CONSENT)})
    with pytest.raises(DataError, match="has no rows") as excinfo:
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
    with pytest.raises(DataError, match="no such file") as excinfo:
        _hand_off(path, tmp_path / "out")
    _assert_one_line_naming(excinfo.value, path, None, None)
    _assert_nothing_written(tmp_path / "out")


def test_spec_without_conversions_is_refused(tmp_path):
    spec_path = tmp_path / "s.toml"
    spec_path.write_text('[features]\npath = "a.csv"\nformat = "csv"\nclick_id = "c"\n[[features.dense]]\ncolumn = "x"\n')
    with pytest.raises(ValueError, match=r"no \[conversions\] section"):
        hand_off(DatasetSpec.load(spec_path), policy=ConsentPolicy.default(), join_secret=JOIN_SECRET, rr_secret=RR_SECRET, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_hand_off_keeps_previous_output(tmp_path):
    _hand_off(_write(tmp_path / "good.parquet", _conversions(50)), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad_columns = _conversions(50)
    bad_columns[CONSENT][7] = "unsure"
    with pytest.raises(DataError):
        _hand_off(_write(tmp_path / "bad.parquet", bad_columns), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
