"""Tests of pcvr.platform.features: the platform's export to a clean room, and labelled sets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from pcvr.data import schema
from pcvr.data.encoding import FeatureEncoding, column_salt, fit_encoding, hash_strings
from pcvr.data.io import DataError, read_ipc
from pcvr.data.spec import DatasetSpec
from pcvr.models.features import cat_column, dense_column
from pcvr.platform.features import export_features, read_labelled
from pcvr.platform.pretrain import pretrain_from_spec
from pcvr.protocols.keys import pseudonymous_keys
from userdata import click_log, write_table, write_user_files

SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """A user's files and the backbone pretrained on them (one epoch, tiny)."""
    root = tmp_path_factory.mktemp("platform")
    spec = write_user_files(root / "data", rows=300)
    encoding = pretrain_from_spec(spec, root / "backbone", epochs=1, generator=torch.Generator().manual_seed(0))
    return root, spec, encoding


def test_export_has_join_key_and_encoded_columns_only(platform, tmp_path) -> None:
    root, spec, encoding = platform
    out = tmp_path / "export" / "features.arrow"
    rows = export_features(spec, backbone_dir=root / "backbone", join_secret=SECRET, out_path=out)
    assert rows == 300
    exported = read_ipc(out)
    assert exported.column_names == [schema.JOIN_KEY, *(cat_column(i) for i in range(3)), dense_column(0), dense_column(1)]
    assert exported.schema.field(schema.JOIN_KEY).type == pa.binary(32)
    log = click_log(300, seed=0)
    assert exported.column(schema.JOIN_KEY).to_pylist() == pseudonymous_keys(log["click"], secret=SECRET)
    # Reference encoding, column by column: the hashed string form, and the documented transforms.
    for i, name in enumerate(("user", "ad", "site")):
        bucket_count = encoding.categorical[i].buckets
        expected = hash_strings(pa.array(log[name]), salt=column_salt(name)) % np.uint64(bucket_count)
        assert exported.column(cat_column(i)).to_pylist() == expected.astype(np.int64).tolist()
    price = np.asarray(log["price"])
    np.testing.assert_allclose(exported.column(dense_column(0)).to_numpy(), np.log1p(price), rtol=1e-6)
    age = np.asarray(log["age"])
    np.testing.assert_allclose(exported.column(dense_column(1)).to_numpy(), (age - encoding.means[1]) / encoding.stds[1], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.arrow"]


def test_export_contains_no_raw_id(platform, tmp_path) -> None:
    root, spec, _ = platform
    out = tmp_path / "features.arrow"
    export_features(spec, backbone_dir=root / "backbone", join_secret=SECRET, out_path=out)
    blob = out.read_bytes()
    assert b"ad-" not in blob and b"c17" not in blob and b"u1" not in blob


def test_export_is_the_same_whatever_the_chunk_size_and_format(platform, tmp_path) -> None:
    root, spec, _ = platform
    export_features(spec, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / "a.arrow")
    small = dataclasses.replace(spec, features=dataclasses.replace(spec.features, chunk_rows=7))
    export_features(small, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / "b.arrow")
    parquet = write_table(click_log(300, seed=0), tmp_path / "clicks.parquet")
    as_parquet = dataclasses.replace(spec, features=dataclasses.replace(spec.features, paths=(parquet,), format=spec.features.format.PARQUET))
    export_features(as_parquet, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / "c.arrow")
    assert read_ipc(tmp_path / "a.arrow").equals(read_ipc(tmp_path / "b.arrow"))
    assert read_ipc(tmp_path / "a.arrow").equals(read_ipc(tmp_path / "c.arrow"))


def test_int_and_string_forms_of_a_categorical_share_a_bucket(platform, tmp_path) -> None:
    """An int column in one file and the same values as strings in another land in the same buckets."""
    root, spec, _ = platform
    log = click_log(50, seed=3)
    as_int = {**log, "user": [int(u[1:]) for u in log["user"]]}
    as_str = {**log, "user": [u[1:] for u in log["user"]]}
    outputs = []
    for name, columns in (("int", as_int), ("str", as_str)):
        path = write_table(columns, tmp_path / f"{name}.parquet")
        one = dataclasses.replace(spec, features=dataclasses.replace(spec.features, paths=(path,), format=spec.features.format.PARQUET))
        export_features(one, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / f"{name}.arrow")
        outputs.append(read_ipc(tmp_path / f"{name}.arrow").column(cat_column(0)).to_pylist())
    assert outputs[0] == outputs[1]


def test_join_key_depends_on_the_secret(platform, tmp_path) -> None:
    root, spec, _ = platform
    export_features(spec, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / "a.arrow")
    export_features(spec, backbone_dir=root / "backbone", join_secret=b"another-secret-of-32-bytes-long!", out_path=tmp_path / "b.arrow")
    a = set(read_ipc(tmp_path / "a.arrow").column(schema.JOIN_KEY).to_pylist())
    assert not a & set(read_ipc(tmp_path / "b.arrow").column(schema.JOIN_KEY).to_pylist())


def test_read_labelled_encodes_features_and_labels(platform) -> None:
    root, spec, _ = platform
    encoding = FeatureEncoding.load(root / "backbone")
    features, labels, truth = read_labelled(spec, encoding, truth_column="price")
    assert features.categorical.shape == (600, 3) and features.dense.shape == (600, 2)
    assert labels.dtype == np.int8 and labels.tolist() == click_log(600, seed=1, prefix="p", with_label=True)["clicked"]
    np.testing.assert_allclose(truth, click_log(600, seed=1, prefix="p")["price"])
    assert read_labelled(spec, encoding)[2] is None


def test_read_labelled_single_class_raises(tmp_path) -> None:
    spec = write_user_files(tmp_path, rows=20)
    columns = click_log(40, seed=1, prefix="p", with_label=True)
    columns["clicked"] = [0] * 40
    write_table(columns, tmp_path / "pretrain.csv")
    with pytest.raises(DataError, match="single class"):
        read_labelled(spec, fit_encoding(spec))


def test_spec_that_does_not_match_the_backbone_is_refused(platform, tmp_path) -> None:
    root, spec, _ = platform
    changed = DatasetSpec.load(spec.source)
    text = spec.source.read_text().replace("buckets = 200", "buckets = 300")
    (tmp_path / "other.toml").write_text(text.replace('"clicks.csv"', f'"{spec.features.paths[0]}"'))
    changed = DatasetSpec.load(tmp_path / "other.toml")
    out = tmp_path / "features.arrow"
    with pytest.raises(DataError) as caught:
        export_features(changed, backbone_dir=root / "backbone", join_secret=SECRET, out_path=out)
    message = str(caught.value)
    assert "\n" not in message and str(changed.source) in message and "features.categorical[0]" in message
    assert "'user'" in message and "encoding.json" in message
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "other.toml"]


# --- bad input (DESIGN §10): one line naming file, row and column; nothing written -------------


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A backbone whose spec gives the dense column ``age`` no missing-value policy."""
    root = tmp_path_factory.mktemp("strict")
    spec = write_user_files(root / "data", rows=200)
    text = spec.source.read_text().replace('transform = "standardize"\nmissing = "mean"', 'transform = "standardize"')
    spec.source.write_text(text)
    spec = DatasetSpec.load(spec.source)
    pretrain_from_spec(spec, root / "backbone", epochs=1, generator=torch.Generator().manual_seed(0))
    return root, spec


def _set(column: str, row: int, value):
    def mutate(log: dict) -> None:
        log[column][row] = value
    return mutate


def _drop(column: str):
    return lambda log: log.pop(column)


BAD_LOGS = {  # case: (mutation of a 200-row log, suffix, column named, row named or None)
    "unknown-column": (_drop("ad"), "csv", "ad", None),
    "dense-not-a-number-csv": (lambda log: log.update(price=[*map(str, log["price"][:130]), "cheap", *map(str, log["price"][131:])]), "csv", "price", 130),
    "dense-wrong-type-parquet": (lambda log: log.update(price=[str(v) for v in log["price"]]), "parquet", "price", None),
    "categorical-wrong-type-parquet": (lambda log: log.update(ad=[float(i) for i in range(200)]), "parquet", "ad", None),
    "nan-without-policy": (_set("age", 77, float("nan")), "parquet", "age", 77),
    "inf-without-policy": (_set("age", 140, float("inf")), "parquet", "age", 140),
    "missing-without-policy-csv": (_set("age", 150, None), "csv", "age", 150),
    "missing-categorical-without-policy": (_set("site", 99, None), "csv", "site", 99),
    "missing-click-id": (_set("click", 65, None), "csv", "click", 65),
    "duplicate-click-id-across-chunks": (_set("click", 190, "c3"), "csv", "click", 190),
}


@pytest.mark.parametrize("case", sorted(BAD_LOGS))
def test_bad_click_log_names_file_row_column_and_writes_nothing(strict, tmp_path, case) -> None:
    root, spec = strict
    mutate, suffix, column, row = BAD_LOGS[case]
    log = click_log(200, seed=0)
    mutate(log)
    path = write_table(log, tmp_path / f"clicks.{suffix}")
    fmt = spec.features.format.PARQUET if suffix == "parquet" else spec.features.format.CSV
    bad = dataclasses.replace(spec, features=dataclasses.replace(spec.features, paths=(path,), format=fmt))
    out = tmp_path / "export" / "features.arrow"
    with pytest.raises(DataError) as caught:
        export_features(bad, backbone_dir=root / "backbone", join_secret=SECRET, out_path=out)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert repr(column) in message, message
    if row is not None:
        assert f"row {row}:" in message, message
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_duplicate_click_id_names_both_rows(strict, tmp_path) -> None:
    root, spec = strict
    log = click_log(200, seed=0)
    log["click"][190] = "c3"
    path = write_table(log, tmp_path / "clicks.csv")
    bad = dataclasses.replace(spec, features=dataclasses.replace(spec.features, paths=(path,)))
    with pytest.raises(DataError, match=rf"row 190: column 'click' repeats the click id of {path} row 3$"):
        export_features(bad, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / "f.arrow")


@pytest.mark.parametrize("content", ["", "click,user,ad,site,price,age\n"])
def test_empty_click_log(strict, tmp_path, content) -> None:
    root, spec = strict
    path = tmp_path / "clicks.csv"
    path.write_text(content)
    bad = dataclasses.replace(spec, features=dataclasses.replace(spec.features, paths=(path,)))
    with pytest.raises(DataError, match=rf"^{path}: file has no rows$"):
        export_features(bad, backbone_dir=root / "backbone", join_secret=SECRET, out_path=tmp_path / "f.arrow")
    assert not (tmp_path / "f.arrow").exists()


@pytest.mark.parametrize("value,row", [("2", 77), (None, 500)])
def test_pretraining_label_outside_the_map_writes_no_backbone(tmp_path, value, row) -> None:
    spec = write_user_files(tmp_path / "data", rows=300)
    columns = click_log(600, seed=1, prefix="p", with_label=True)
    columns["clicked"] = [str(v) for v in columns["clicked"]]
    columns["clicked"][row] = value
    path = write_table(columns, spec.pretrain.paths[0])
    with pytest.raises(DataError) as caught:
        pretrain_from_spec(spec, tmp_path / "platform" / "backbone", epochs=1, generator=torch.Generator().manual_seed(0))
    message = str(caught.value)
    assert message.startswith(f"{path}: row {row}: column 'clicked' ") and "\n" not in message, message
    assert not (tmp_path / "platform").exists() or list((tmp_path / "platform").iterdir()) == []
