"""The synthetic world (pcvr.data.synth) on a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pcvr.advertiser.handoff import iter_conversions
from pcvr.data import synth as schema
from pcvr.data.encoding import fit_encoding
from pcvr.data.spec import DatasetSpec
from pcvr.data.synth import WorldConfig, advertiser_spec_path, holdout_spec_path, synthesize

TINY = dict(rows=3000, users=500, chunk_rows=1000, pretrain_rows=2000, holdout_rows=1000)
PARQUET_FILES = (
    "platform/pretrain.parquet",
    "platform/features/advertiser_0.parquet",
    "platform/features/advertiser_1.parquet",
    "platform/features/advertiser_2.parquet",
    "advertiser_0/conversions.parquet",
    "advertiser_1/conversions.parquet",
    "advertiser_2/conversions.parquet",
    "holdout.parquet",
)
SPEC_FILES = ("advertiser_0.toml", "advertiser_1.toml", "advertiser_2.toml", "holdout.toml")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("worlds")
    out = {}
    for name, seed in (("a", 11), ("a_again", 11), ("b", 12)):
        config = WorldConfig(seed=seed, **TINY)
        out[name] = (root / name, synthesize(root / name, config))
    return out


def _files(out_dir: Path) -> set[str]:
    return {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()}


def test_writes_documented_files_and_nothing_else(worlds):
    out_dir, _ = worlds["a"]
    assert _files(out_dir) == set(PARQUET_FILES) | set(SPEC_FILES) | {"world.json"}
    # The staging directory was renamed into place, not left beside it.
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["a", "a_again", "b"]


def test_row_counts_and_schemas(worlds):
    out_dir, summary = worlds["a"]
    assert pq.read_metadata(out_dir / "platform/pretrain.parquet").num_rows == 2000
    assert pq.read_metadata(out_dir / "holdout.parquet").num_rows == 1000
    for k in range(3):
        features = pq.read_table(out_dir / f"platform/features/advertiser_{k}.parquet")
        conversions = pq.read_table(out_dir / f"advertiser_{k}/conversions.parquet")
        assert features.num_rows == conversions.num_rows == 1000
        assert tuple(features.column_names) == schema.FEATURE_COLUMNS  # no ground truth on the platform side
        assert tuple(conversions.column_names) == schema.CONVERSION_COLUMNS
        # The platform's feature log and the advertiser's conversions describe the same clicks.
        assert features.column(schema.CLICK_ID).equals(conversions.column(schema.CLICK_ID))
        assert set(features.column(schema.ADVERTISER_ID).to_pylist()) == {summary["clean_rooms"][k]["advertiser_id"]}
    holdout = pq.read_table(out_dir / "holdout.parquet")
    assert set(holdout.column_names) == set(schema.FEATURE_COLUMNS) | {schema.LABEL, schema.TRUE_PROB}


def test_click_ids_unique_across_the_world(worlds):
    out_dir, _ = worlds["a"]
    feature_files = ["platform/pretrain.parquet", "holdout.parquet"] + [
        f"platform/features/advertiser_{k}.parquet" for k in range(3)
    ]
    ids = [i for name in feature_files for i in pq.read_table(out_dir / name).column(schema.CLICK_ID).to_pylist()]
    assert len(ids) == len(set(ids)) == 2000 + 1000 + 3000


def test_conversions_pass_the_advertiser_reader_through_their_spec(worlds):
    out_dir, _ = worlds["a"]
    for k in range(3):
        spec = DatasetSpec.load(advertiser_spec_path(out_dir, k))
        assert spec.conversions.paths == (out_dir / f"advertiser_{k}" / "conversions.parquet",)
        parts = list(iter_conversions(spec, join_secret=b"j" * 32))
        labels = np.concatenate([part.labels for part in parts])
        expected = pq.read_table(spec.conversions.paths[0]).column(schema.CONVERTED).to_numpy()
        assert labels.tolist() == expected.tolist()


def test_specs_describe_the_files_beside_them(worlds):
    out_dir, _ = worlds["a"]
    spec = DatasetSpec.load(advertiser_spec_path(out_dir, 1))
    assert spec.features.paths == (out_dir / "platform" / "features" / "advertiser_1.parquet",)
    assert spec.pretrain.paths == (out_dir / "platform" / "pretrain.parquet",)
    assert spec.features.columns == (*schema.CATEGORICAL_FIELDS, *schema.DENSE_FIELDS)
    holdout = DatasetSpec.load(holdout_spec_path(out_dir))
    assert holdout.pretrain.paths == (out_dir / "holdout.parquet",) and holdout.conversions is None
    assert holdout.features.digest() == spec.features.digest()  # the backbone's encoding reads the holdout too
    encoding = fit_encoding(spec)  # every file the spec names reads with the spec's own columns
    assert len(encoding.buckets) == len(schema.CATEGORICAL_FIELDS) and encoding.num_dense == len(schema.DENSE_FIELDS)


def test_same_seed_gives_identical_contents(worlds):
    (first, first_summary), (second, second_summary) = worlds["a"], worlds["a_again"]
    for name in PARQUET_FILES:
        assert pq.read_table(first / name).equals(pq.read_table(second / name)), name
    assert (first / "world.json").read_text() == (second / "world.json").read_text()
    assert first_summary == second_summary


def test_different_seed_gives_different_contents(worlds):
    (first, _), (other, _) = worlds["a"], worlds["b"]
    for name in PARQUET_FILES:
        a, b = pq.read_table(first / name), pq.read_table(other / name)
        assert not a.equals(b), name
        assert a.column("timestamp").to_pylist() != b.column("timestamp").to_pylist(), name


def test_summary_matches_files(worlds):
    out_dir, summary = worlds["a"]
    assert json.loads((out_dir / "world.json").read_text()) == json.loads(json.dumps(summary))
    holdout = pq.read_table(out_dir / "holdout.parquet")
    assert summary["holdout"]["base_rate"] == pytest.approx(np.mean(holdout.column(schema.LABEL)))
    for k, room in enumerate(summary["clean_rooms"]):
        converted = pq.read_table(out_dir / f"advertiser_{k}/conversions.parquet").column(schema.CONVERTED)
        assert room["rows"] == 1000 and room["base_rate"] == pytest.approx(np.mean(converted))
    assert 0.5 < summary["holdout"]["oracle_auc"] <= 1.0


def test_holdout_base_rate_near_config(worlds):
    out_dir, summary = worlds["a"]
    base_rate = WorldConfig().base_rate
    holdout = pq.read_table(out_dir / "holdout.parquet")
    true_prob = np.asarray(holdout.column(schema.TRUE_PROB))
    assert ((true_prob > 0) & (true_prob < 1)).all()
    assert base_rate / 2 < true_prob.mean() < base_rate * 2
    assert base_rate / 2 < summary["holdout"]["base_rate"] < base_rate * 2


def test_labels_follow_true_probabilities(worlds):
    out_dir, _ = worlds["a"]
    holdout = pq.read_table(out_dir / "holdout.parquet")
    label = np.asarray(holdout.column(schema.LABEL))
    true_prob = np.asarray(holdout.column(schema.TRUE_PROB))
    # Positives carry a clearly higher true probability than negatives.
    assert true_prob[label == 1].mean() > 1.5 * true_prob[label == 0].mean()


def test_conversion_types_agree_with_labels(worlds):
    out_dir, _ = worlds["a"]
    conversions = pq.read_table(out_dir / "advertiser_0/conversions.parquet").to_pydict()
    for converted, kind in zip(conversions[schema.CONVERTED], conversions[schema.CONVERSION_TYPE]):
        assert (kind != "none") == bool(converted)
        assert kind in schema.CONVERSION_TYPES


def test_consent_shares_follow_consent_mix(worlds):
    out_dir, summary = worlds["a"]
    consent = np.concatenate(
        [np.asarray(pq.read_table(out_dir / f"advertiser_{k}/conversions.parquet").column(schema.CONSENT)) for k in range(3)]
    )
    for level, share in WorldConfig().consent_mix:
        assert abs((consent == level).mean() - share) < 0.05, level
    assert dict(summary["config"]["consent_mix"]) == dict(WorldConfig().consent_mix)


def test_consent_mix_with_zero_shares(tmp_path):
    config = WorldConfig(
        seed=3, rows=300, users=100, chunk_rows=1000, pretrain_rows=100, holdout_rows=100,
        consent_mix=(("standard", 0.0), ("limited", 1.0), ("opt_out", 0.0)),
    )
    synthesize(tmp_path / "w", config)
    consent = pq.read_table(tmp_path / "w" / "advertiser_1" / "conversions.parquet").column(schema.CONSENT)
    assert set(consent.to_pylist()) == {"limited"}


def test_refuses_existing_out_dir(tmp_path):
    out_dir = tmp_path / "world"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="world"):
        synthesize(out_dir, WorldConfig(seed=0, **TINY))
    assert _files(out_dir) == {"keep.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"rows": 0},
        {"users": 0},
        {"chunk_rows": 0},
        {"holdout_rows": 0},
        {"base_rate": 0.0},
        {"base_rate": 0.5},
        {"shift_scale": -1.0},
        {"consent_mix": (("standard", 0.9), ("limited", 0.2), ("opt_out", -0.1))},
        {"consent_mix": (("standard", 0.5), ("limited", 0.4))},
        {"consent_mix": (("standard", 0.9), ("gold", 0.1))},
    ],
)
def test_bad_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        WorldConfig(**overrides)
