"""Feature encoding (pcvr.data.encoding): the string hash, missing values, transforms, fitted statistics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from pcvr.data.encoding import FeatureEncoding, column_salt, fit_encoding, hash_strings
from pcvr.data.io import DataError
from pcvr.data.readers import iter_chunks
from pcvr.data.encoding import feature_roles
from pcvr.models.features import cat_column, dense_column
from userdata import click_log, write_table, write_user_files

_M = (1 << 64) - 1


def _reference_hash(text: str, salt: int) -> int:
    """Byte-at-a-time FNV-1a 64 and the SplitMix64 finalizer, in plain Python."""
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _M
    x = h ^ salt
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M
    return x ^ (x >> 31)


def test_vectorized_hash_matches_the_byte_loop_reference():
    rng = np.random.default_rng(0)
    words = ["", "a", "ab", "é", "日本語", "x" * 300] + ["".join(rng.choice(list("abc123-_"), rng.integers(0, 20))) for _ in range(200)]
    salt = column_salt("user")
    got = hash_strings(pa.array(words), salt=salt)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == [_reference_hash(w, salt) for w in words]
    sliced = pa.array(words).slice(3, 50)  # an array that starts inside its buffers
    assert [int(v) for v in hash_strings(sliced, salt=salt)] == [_reference_hash(w, salt) for w in words[3:53]]
    large = pa.array(words, type=pa.large_string())
    assert np.array_equal(hash_strings(large, salt=salt), got)


def test_pinned_values_do_not_drift():
    """Buckets must be the same on every machine and release: pin two hashes."""
    assert int(hash_strings(pa.array(["user-42"]), salt=column_salt("user"))[0]) == _reference_hash("user-42", column_salt("user"))
    assert column_salt("user") == int.from_bytes(__import__("hashlib").sha256(b"pcvr/categorical/v1|user").digest()[:8], "big")


def test_columns_are_salted_apart():
    values = pa.array([f"v{i}" for i in range(2000)])
    a, b = hash_strings(values, salt=column_salt("a")) % 100, hash_strings(values, salt=column_salt("b")) % 100
    assert (a == b).mean() < 0.05  # ≈ 1/100 for independent buckets


def test_buckets_are_roughly_uniform():
    buckets = hash_strings(pa.array([str(i) for i in range(50_000)]), salt=column_salt("ad")) % np.uint64(50)
    counts = np.bincount(buckets.astype(np.int64), minlength=50)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 100  # 49 degrees of freedom: P(chi2 > 100) < 1e-4


@pytest.fixture
def spec(tmp_path):
    return write_user_files(tmp_path, rows=100, chunk_rows=17)


def test_fit_streams_float64_statistics_equal_to_numpy(spec):
    encoding = fit_encoding(spec)
    pretrain = click_log(200, seed=1, prefix="p", with_label=True)
    for j, name in enumerate(("price", "age")):
        values = np.asarray(pretrain[name], dtype=np.float64)
        assert encoding.means[j] == pytest.approx(values.mean(), rel=1e-12)
        assert encoding.stds[j] == pytest.approx(values.std(), rel=1e-10)
    assert encoding.spec_digest == spec.features.digest()
    assert encoding.buckets == (201, 51, 50)  # user and ad: one more bucket for missing values; site: missing = error


def test_missing_values_follow_their_policy(spec, tmp_path):
    encoding = fit_encoding(spec)
    log = click_log(6, seed=5)
    log["user"][1] = None
    log["ad"][2] = None
    log["price"][3] = None
    log["age"][4] = float("nan")
    path = write_table(log, tmp_path / "holes.csv")
    (chunk,) = iter_chunks([path], fmt=spec.features.format, columns=feature_roles(spec.features), chunk_rows=100)
    encoded = encoding.encode(chunk)
    assert encoded[cat_column(0)][1] == 200 and encoded[cat_column(1)][2] == 50  # the missing-value buckets
    assert encoded[cat_column(0)][0] < 200
    assert encoded[dense_column(0)][3] == 0.0  # missing = zero: 0 before log1p
    assert encoded[dense_column(1)][4] == pytest.approx(0.0, abs=1e-6)  # missing = mean: standardizes to 0
    assert encoded[dense_column(0)].dtype == np.float32 and encoded[cat_column(0)].dtype == np.int32


@pytest.mark.parametrize("value,what", [(None, "is missing a value"), (float("nan"), "is NaN"), (float("inf"), "is inf")])
def test_a_dense_value_missing_without_a_policy_names_file_row_column(spec, tmp_path, value, what):
    text = spec.source.read_text().replace('transform = "standardize"\nmissing = "mean"', 'transform = "standardize"')
    (tmp_path / "strict.toml").write_text(text)
    from pcvr.data.spec import DatasetSpec

    strict = DatasetSpec.load(tmp_path / "strict.toml")
    encoding = dataclasses.replace(fit_encoding(spec), dense=strict.features.dense)
    log = click_log(40, seed=6)
    log["age"][29] = value
    path = write_table(log, tmp_path / "bad.parquet")
    chunks = iter_chunks([path], fmt=strict.features.format.PARQUET, columns=feature_roles(strict.features), chunk_rows=10)
    with pytest.raises(DataError) as caught:
        for chunk in chunks:
            encoding.encode(chunk)
    message = str(caught.value)
    assert message.startswith(f"{path}: row 29: column 'age' {what}") and "\n" not in message


def test_missing_categorical_under_error_policy(spec, tmp_path):
    log = click_log(10, seed=7)
    log["site"][8] = None
    path = write_table(log, tmp_path / "bad.csv")
    (chunk,) = iter_chunks([path], fmt=spec.features.format, columns=feature_roles(spec.features), chunk_rows=100)
    with pytest.raises(DataError, match=rf"^{path}: row 8: column 'site' is missing a value$"):
        fit_encoding(spec).encode(chunk)


def test_save_load_round_trip_and_bad_file(spec, tmp_path):
    encoding = fit_encoding(spec)
    encoding.save(tmp_path / "backbone")
    assert FeatureEncoding.load(tmp_path / "backbone") == encoding
    assert json.loads((tmp_path / "backbone" / "encoding.json").read_text())["dense"][1]["transform"] == "standardize"
    (tmp_path / "backbone" / "encoding.json").write_text("{}")
    with pytest.raises(ValueError, match="encoding.json: not a feature encoding"):
        FeatureEncoding.load(tmp_path / "backbone")


def test_a_pretraining_column_without_any_finite_value(spec, tmp_path):
    columns = click_log(30, seed=1, prefix="p", with_label=True)
    columns["price"] = [None] * 30
    write_table(columns, spec.pretrain.paths[0])
    with pytest.raises(DataError, match="'price' has no finite value"):
        fit_encoding(spec)
