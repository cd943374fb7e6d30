"""The dataset spec (pcvr.data.spec): parsing, round trip, digest, and one error per bad key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pcvr.data.schema import ConsentLevel
from pcvr.data.spec import (
    CategoricalMissing,
    DatasetSpec,
    DenseMissing,
    Format,
    Transform,
)

EXAMPLE = """
[features]
path = "clicks.csv"
format = "csv"
click_id = "click_id"
default_buckets = 10000
chunk_rows = 4096

[[features.categorical]]
column = "user"
buckets = 50000
missing = "bucket"

[[features.categorical]]
column = "ad"
missing = "error"

[[features.dense]]
column = "price"
transform = "log1p"
missing = "zero"

[[features.dense]]
column = "age"

[pretrain]
path = ["pretrain/a.csv", "pretrain/b.csv"]
format = "csv"
label = "clicked"
positive = [1]
negative = ["0"]

[conversions]
path = "conversions.csv"
format = "csv"
click_id = "click"
label = "purchased"
positive = ["yes", "1"]
negative = ["no", "0"]
consent = "consent_given"
consent_levels = { full = "standard", partial = "limited", withdrawn = "opt_out" }
timestamp = "ts"
"""

CRITEO = """
[features]
path = "day_0.tsv"
format = "criteo-tsv"
click_id = "row"
default_buckets = 1000

[[features.categorical]]
column = "C1"

[[features.dense]]
column = "I1"
transform = "log1p"
missing = "zero"

[pretrain]
path = "day_0.tsv"
format = "criteo-tsv"
label = "label"
positive = ["1"]

[conversions]
path = "day_0.tsv"
format = "criteo-tsv"
click_id = "row"
label = "label"
positive = ["1"]
consent_level = "standard"
"""


def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_parses_into_the_documented_tree(tmp_path):
    spec = DatasetSpec.load(_write(tmp_path, EXAMPLE))
    features = spec.require("features")
    assert features.paths == (tmp_path / "clicks.csv",)
    assert features.format is Format.CSV and features.chunk_rows == 4096
    assert [(c.column, c.buckets, c.missing) for c in features.categorical] == [
        ("user", 50000, CategoricalMissing.BUCKET),
        ("ad", 10000, CategoricalMissing.ERROR),
    ]
    assert [(d.column, d.transform, d.missing) for d in features.dense] == [
        ("price", Transform.LOG1P, DenseMissing.ZERO),
        ("age", Transform.NONE, DenseMissing.ERROR),
    ]
    assert spec.pretrain.paths == (tmp_path / "pretrain" / "a.csv", tmp_path / "pretrain" / "b.csv")
    assert spec.pretrain.positive == ("1",) and spec.pretrain.negative == ("0",)
    conversions = spec.conversions
    assert conversions.positive == ("yes", "1") and conversions.negative == ("no", "0")
    assert dict(conversions.consent_levels) == {
        "full": ConsentLevel.STANDARD,
        "partial": ConsentLevel.LIMITED,
        "withdrawn": ConsentLevel.OPT_OUT,
    }
    assert conversions.consent_level is None and conversions.timestamp == "ts"


def test_criteo_example_parses(tmp_path):
    spec = DatasetSpec.load(_write(tmp_path, CRITEO))
    assert spec.features.format is Format.CRITEO_TSV and spec.features.click_id == "row"
    assert spec.conversions.consent_level is ConsentLevel.STANDARD and spec.conversions.columns == ("label",)


@pytest.mark.parametrize("text", [EXAMPLE, CRITEO])
def test_to_toml_round_trips(tmp_path, text):
    spec = DatasetSpec.load(_write(tmp_path, text))
    again = DatasetSpec.load(_write(tmp_path, spec.to_toml(), name="again.toml"))
    assert again == DatasetSpec(source=again.source, features=spec.features, pretrain=spec.pretrain, conversions=spec.conversions)


def test_write_is_atomic_and_loadable(tmp_path):
    spec = DatasetSpec.load(_write(tmp_path, EXAMPLE))
    target = DatasetSpec(source=tmp_path / "written.toml", features=spec.features)
    target.write()
    assert DatasetSpec.load(tmp_path / "written.toml").features == spec.features
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml", "written.toml"]


def test_digest_follows_columns_not_paths(tmp_path):
    base = DatasetSpec.load(_write(tmp_path, EXAMPLE)).features.digest()
    moved = DatasetSpec.load(_write(tmp_path, EXAMPLE.replace('"clicks.csv"', '"other/x.parquet"').replace('format = "csv"\nclick_id = "click_id"', 'format = "parquet"\nclick_id = "click_id"'), "b.toml"))
    assert moved.features.digest() == base
    for old, new in [('buckets = 50000', 'buckets = 50001'), ('transform = "log1p"', 'transform = "none"'), ('missing = "zero"', 'missing = "mean"'), ('column = "age"', 'column = "age2"')]:
        changed = DatasetSpec.load(_write(tmp_path, EXAMPLE.replace(old, new, 1), "c.toml"))
        assert changed.features.digest() != base, old


def test_require_names_the_spec_and_the_missing_section(tmp_path):
    path = _write(tmp_path, EXAMPLE.split("[pretrain]")[0])
    spec = DatasetSpec.load(path)
    with pytest.raises(ValueError, match=re.escape(f"spec {path}: no [conversions] section")):
        spec.require("conversions")


def _sub(old: str, new: str, text: str = EXAMPLE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


BAD = {
    "unknown-top-level-key": (EXAMPLE + "\n[extra]\na = 1\n", "extra"),
    "unknown-features-key": (_sub('chunk_rows = 4096', 'chunk_rows = 4096\nchunkrows = 3'), "features.chunkrows"),
    "unknown-categorical-key": (_sub('buckets = 50000', 'bukets = 50000'), "features.categorical[0].bukets"),
    "unknown-dense-key": (_sub('transform = "log1p"', 'transfrom = "log1p"'), "features.dense[0].transfrom"),
    "unknown-conversions-key": (_sub('timestamp = "ts"', 'time = "ts"'), "conversions.time"),
    "missing-path": (_sub('path = "clicks.csv"\n', ''), "features.path"),
    "path-not-a-string": (_sub('path = "clicks.csv"', 'path = 3'), "features.path"),
    "empty-path-list": (_sub('path = "clicks.csv"', 'path = []'), "features.path"),
    "unknown-format": (_sub('format = "csv"', 'format = "xlsx"'), "features.format"),
    "missing-click-id": (_sub('click_id = "click_id"\n', ''), "features.click_id"),
    "click-id-not-string": (_sub('click_id = "click_id"', 'click_id = 7'), "features.click_id"),
    "default-buckets-zero": (_sub('default_buckets = 10000', 'default_buckets = 0'), "features.default_buckets"),
    "chunk-rows-float": (_sub('chunk_rows = 4096', 'chunk_rows = 1.5'), "features.chunk_rows"),
    "buckets-negative": (_sub('buckets = 50000', 'buckets = -3'), "features.categorical[0].buckets"),
    "buckets-bool": (_sub('buckets = 50000', 'buckets = true'), "features.categorical[0].buckets"),
    "no-buckets-no-default": (_sub('default_buckets = 10000\n', ''), "features.categorical[1].buckets"),
    "unknown-categorical-missing": (_sub('missing = "bucket"', 'missing = "drop"'), "features.categorical[0].missing"),
    "unknown-transform": (_sub('transform = "log1p"', 'transform = "sqrt"'), "features.dense[0].transform"),
    "unknown-dense-missing": (_sub('missing = "zero"', 'missing = "median"'), "features.dense[0].missing"),
    "categorical-not-a-table": (_sub('[[features.categorical]]\ncolumn = "user"\nbuckets = 50000\nmissing = "bucket"\n\n[[features.categorical]]\ncolumn = "ad"\nmissing = "error"\n', ''). replace('chunk_rows = 4096', 'chunk_rows = 4096\ncategorical = ["user"]'), "features.categorical[0]"),
    "empty-categorical-list": (_sub('chunk_rows = 4096', 'chunk_rows = 4096\ncategorical = []', EXAMPLE.split("[[features.categorical]]")[0] + EXAMPLE[EXAMPLE.index("[[features.dense]]"):]), "features.categorical"),
    "no-feature-columns": (EXAMPLE.split("[[features.categorical]]")[0] + "[pretrain]" + EXAMPLE.split("[pretrain]")[1], "features"),
    "duplicate-column": (_sub('column = "age"', 'column = "user"'), "features.dense[1].column"),
    "feature-column-is-click-id": (_sub('column = "ad"', 'column = "click_id"'), "features.categorical[1].column"),
    "empty-column-name": (_sub('column = "ad"', 'column = ""'), "features.categorical[1].column"),
    "criteo-click-id-not-row": (_sub('click_id = "row"', 'click_id = "id"', CRITEO), "features.click_id"),
    "criteo-unknown-column": (_sub('column = "C1"', 'column = "C27"', CRITEO), "features.categorical[0].column"),
    "criteo-unknown-label": (_sub('label = "label"', 'label = "clicked"', CRITEO), "pretrain.label"),
    "pretrain-without-features": ("[pretrain]" + EXAMPLE.split("[pretrain]")[1].split("[conversions]")[0], "[features]"),
    "pretrain-label-is-feature": (_sub('label = "clicked"', 'label = "price"'), "pretrain.label"),
    "positive-empty": (_sub('positive = [1]', 'positive = []'), "pretrain.positive"),
    "positive-not-list": (_sub('positive = [1]', 'positive = "1"'), "pretrain.positive"),
    "positive-bool": (_sub('positive = [1]', 'positive = [true]'), "pretrain.positive"),
    "positive-twice": (_sub('positive = ["yes", "1"]', 'positive = ["yes", "yes"]'), "conversions.positive"),
    "negative-overlaps-positive": (_sub('negative = ["no", "0"]', 'negative = ["no", "1"]'), "conversions.negative"),
    "consent-and-consent-level": (_sub('timestamp = "ts"', 'timestamp = "ts"\nconsent_level = "standard"'), "conversions"),
    "neither-consent-nor-level": (_sub('consent = "consent_given"\nconsent_levels = { full = "standard", partial = "limited", withdrawn = "opt_out" }\n', ''), "conversions"),
    "consent-without-map": (_sub('consent_levels = { full = "standard", partial = "limited", withdrawn = "opt_out" }\n', ''), "conversions.consent_levels"),
    "consent-map-empty": (_sub('consent_levels = { full = "standard", partial = "limited", withdrawn = "opt_out" }', 'consent_levels = {}'), "conversions.consent_levels"),
    "consent-map-unknown-level": (_sub('withdrawn = "opt_out"', 'withdrawn = "gone"'), "conversions.consent_levels.withdrawn"),
    "consent-level-unknown": (_sub('format = "criteo-tsv"\nclick_id = "row"\nlabel = "label"\npositive = ["1"]\nconsent_level = "standard"', 'format = "criteo-tsv"\nclick_id = "row"\nlabel = "label"\npositive = ["1"]\nconsent_level = "full"', CRITEO), "conversions.consent_level"),
    "consent-map-with-level": (_sub('consent_level = "standard"', 'consent_level = "standard"\nconsent_levels = { a = "standard" }', CRITEO), "conversions.consent_levels"),
    "conversions-duplicate-column": (_sub('timestamp = "ts"', 'timestamp = "click"'), "conversions.timestamp"),
    "conversions-label-missing": (_sub('label = "purchased"\n', ''), "conversions.label"),
    "section-not-a-table": ('features = "clicks.csv"\n', "features"),
    "empty-spec": ("", "dataset spec"),
    "bad-toml": ("[features\n", "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_names_the_file_and_the_key(tmp_path, case):
    text, key = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        DatasetSpec.load(path)
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert key in message, message


def test_missing_spec_file_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot read dataset spec"):
        DatasetSpec.load(tmp_path / "absent.toml")
