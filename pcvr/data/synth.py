"""A synthetic ad world whose true conversion probability is known for every click.

Users, ads and advertisers carry latent vectors. The true conversion logit is

    z = b + uᵀ M a + w_u·u + w_a·a + device + format + hour      (shared component)
          + s_k + c_k·u                                           (advertiser shift)

where u, a are the user and ad latents and k the ad's advertiser. The platform's
own (pretraining) advertisers have a small offset and no interaction shift; the
clean-room advertisers have both, so a backbone pretrained on platform data is
good but mis-specified for them, and adapters have something real to learn.
The intercept b is solved so that the clean-room population converts at
``base_rate``. The model sees the latents only through noisy dense features and
categorical ids, so even the true model is not recoverable exactly.

Everything is generated from ``seed`` in chunks and written to Parquet, so
memory stays bounded whatever the row count:

    OUT/world.json                          config, advertiser ids, base rates, oracle AUC
    OUT/platform/pretrain.parquet           platform's own labelled clicks (truth included)
    OUT/platform/features/advertiser_K.parquet   platform feature log of clicks on K's ads
    OUT/advertiser_K/conversions.parquet    advertiser K's conversions and consent levels
    OUT/holdout.parquet                     held-out clean-room clicks with label and true_prob
    OUT/advertiser_K.toml                   the dataset spec of advertiser K's data (features, pretrain, conversions)
    OUT/holdout.toml                        the dataset spec of the holdout (its [pretrain] section: true labels)

The specs are what make the synthetic world one producer among others: every
later step reads it through them (:mod:`pcvr.data.spec`), exactly as it reads a
user's own files. Column names are this module's; pcvr's own steps know none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from pcvr.data.schema import ConsentLevel
from pcvr.data.spec import (
    CategoricalColumn,
    CategoricalMissing,
    ConversionSpec,
    DatasetSpec,
    DenseColumn,
    FeatureSpec,
    Format,
    LabelSpec,
)

__all__ = ["WorldConfig", "World", "synthesize", "world_spec", "holdout_spec", "advertiser_spec_path", "holdout_spec_path", "TRUE_PROB"]

# The synthetic world's column names (its own files; nothing else in pcvr depends on them).
CLICK_ID = "click_id"
USER_ID = "user_id"
AD_ID = "ad_id"
ADVERTISER_ID = "advertiser_id"
TIMESTAMP = "timestamp"
CATEGORICAL_FIELDS = (USER_ID, AD_ID, ADVERTISER_ID, "user_segment", "user_geo", "user_device", "ad_category", "ad_format")
LATENT_DIM = 8
DENSE_FIELDS = tuple(f"user_dense_{i}" for i in range(LATENT_DIM)) + tuple(f"ad_dense_{i}" for i in range(LATENT_DIM)) + (
    "hour_sin",
    "hour_cos",
)
FEATURE_COLUMNS = (CLICK_ID, *CATEGORICAL_FIELDS, *DENSE_FIELDS, TIMESTAMP)
CONVERTED = "converted"
CONVERSION_TYPE = "conversion_type"
CONSENT = "consent"
CONVERSION_COLUMNS = (CLICK_ID, CONVERTED, CONVERSION_TYPE, TIMESTAMP, CONSENT)
CONVERSION_TYPES = ("none", "add_to_cart", "checkout", "purchase")
LABEL = "label"  # ground truth, in the pretraining and holdout sets only
TRUE_PROB = "true_prob"
_CARDINALITY = {"user_segment": 4, "user_geo": 50, "user_device": 3, "ad_category": 6, "ad_format": 4}

_DAY = 86_400
_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z
_CONVERSION_TYPE_MIX = (0.5, 0.3, 0.2)  # add_to_cart, checkout, purchase among positives


@dataclass(frozen=True)
class WorldConfig:
    """Size and shape of the synthetic world.

    Attributes:
        seed: everything is a deterministic function of it.
        rows: clicks on clean-room advertisers' ads, split evenly across them.
        advertisers: number of clean-room advertisers (one clean room each).
        pretrain_rows: platform's own labelled clicks; ``None`` means ``rows``.
        holdout_rows: held-out clean-room clicks; ``None`` means ``rows // 4``.
        platform_advertisers: advertisers whose conversions the platform already has.
        users: size of the user population (shared by everyone).
        ads_per_advertiser: ads each advertiser runs.
        base_rate: target conversion rate of clean-room clicks, in (0, 0.5).
        shift_scale: strength of the clean-room advertisers' shift (0 = none).
        consent_mix: share of users at each consent level; sums to 1.
        chunk_rows: rows generated and written at a time.
    """

    seed: int = 0
    rows: int = 600_000
    advertisers: int = 3
    pretrain_rows: int | None = None
    holdout_rows: int | None = None
    platform_advertisers: int = 20
    users: int = 50_000
    ads_per_advertiser: int = 50
    base_rate: float = 0.025
    shift_scale: float = 1.0
    consent_mix: tuple[tuple[str, float], ...] = (("standard", 0.85), ("limited", 0.10), ("opt_out", 0.05))
    chunk_rows: int = 200_000

    def __post_init__(self) -> None:
        for name in ("rows", "advertisers", "platform_advertisers", "users", "ads_per_advertiser", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("pretrain_rows", "holdout_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if not 0.0 < self.base_rate < 0.5:
            raise ValueError(f"base_rate must be in (0, 0.5); got {self.base_rate}")
        if self.shift_scale < 0:
            raise ValueError(f"shift_scale must be >= 0; got {self.shift_scale}")
        for level, share in self.consent_mix:
            ConsentLevel.parse(level)
            if share < 0:
                raise ValueError(f"consent_mix share for {level!r} must be >= 0; got {share}")
        if not math.isclose(sum(share for _, share in self.consent_mix), 1.0, abs_tol=1e-9):
            raise ValueError("consent_mix shares must sum to 1")

    @property
    def n_pretrain(self) -> int:
        return self.rows if self.pretrain_rows is None else self.pretrain_rows

    @property
    def n_holdout(self) -> int:
        return max(1, self.rows // 4) if self.holdout_rows is None else self.holdout_rows


class World:
    """The latent state of the synthetic world; draws clicks with their true probability."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        d = LATENT_DIM
        self.user_latent = rng.standard_normal((config.users, d))
        self.user_geo = rng.integers(0, 50, config.users)
        self.user_device = rng.integers(0, 3, config.users)
        levels = [level for level, _ in config.consent_mix]
        shares = np.array([share for _, share in config.consent_mix])
        self.user_consent = np.array(levels, dtype=object)[rng.choice(len(levels), config.users, p=shares)]

        n_advertisers = config.platform_advertisers + config.advertisers
        n_ads = n_advertisers * config.ads_per_advertiser
        self.ad_latent = rng.standard_normal((n_ads, d))
        self.ad_advertiser = np.repeat(np.arange(n_advertisers), config.ads_per_advertiser)
        self.ad_format = rng.integers(0, 4, n_ads)
        self.platform_advertiser_ids = np.arange(config.platform_advertisers)
        self.clean_room_advertiser_ids = np.arange(config.platform_advertisers, n_advertisers)

        self.interaction = rng.standard_normal((d, d)) / d
        self.user_weight = 0.3 * rng.standard_normal(d)
        self.ad_weight = 0.3 * rng.standard_normal(d)
        self.device_effect = np.array([0.0, 0.2, -0.2])
        self.format_effect = 0.2 * rng.standard_normal(4)
        self.advertiser_offset = 0.2 * rng.standard_normal(n_advertisers)
        self.advertiser_shift = np.zeros((n_advertisers, d))
        common = rng.standard_normal(d) / math.sqrt(d)
        for k in self.clean_room_advertiser_ids:
            own = rng.standard_normal(d) / math.sqrt(d)
            self.advertiser_shift[k] = config.shift_scale * (0.8 * common + 0.6 * own)
            self.advertiser_offset[k] += config.shift_scale * 0.3 * rng.standard_normal()
        self.intercept = 0.0
        self.intercept = self._solve_intercept(rng)

    def _logit_without_intercept(self, users: np.ndarray, ads: np.ndarray, hours: np.ndarray) -> np.ndarray:
        u, a = self.user_latent[users], self.ad_latent[ads]
        advertiser = self.ad_advertiser[ads]
        shared = (
            np.einsum("ni,ij,nj->n", u, self.interaction, a)
            + u @ self.user_weight
            + a @ self.ad_weight
            + self.device_effect[self.user_device[users]]
            + self.format_effect[self.ad_format[ads]]
            + 0.3 * np.sin(2 * np.pi * hours / 24)
        )
        shift = self.advertiser_offset[advertiser] + np.einsum("ni,ni->n", u, self.advertiser_shift[advertiser])
        return shared + shift

    def _solve_intercept(self, rng: np.random.Generator) -> float:
        """Bisection for b so the clean-room population's mean true probability is base_rate."""
        users, ads, hours = self._draw_clicks(rng, 200_000, self.clean_room_advertiser_ids)
        logits = self._logit_without_intercept(users, ads, hours)
        low, high = -20.0, 20.0
        for _ in range(60):
            mid = (low + high) / 2
            if (1 / (1 + np.exp(-(logits + mid)))).mean() < self.config.base_rate:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    def _draw_clicks(
        self, rng: np.random.Generator, n: int, advertisers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        per = self.config.ads_per_advertiser
        advertiser = rng.choice(advertisers, n)
        ads = advertiser * per + rng.integers(0, per, n)
        users = rng.integers(0, self.config.users, n)
        hours = rng.integers(0, 24, n)
        return users, ads, hours

    def clicks(
        self, rng: np.random.Generator, n: int, *, advertisers: np.ndarray, start_day: int, days: int, id_prefix: str
    ) -> dict[str, np.ndarray]:
        """Draw ``n`` clicks on the given advertisers' ads, with features and ground truth."""
        users, ads, hours = self._draw_clicks(rng, n, advertisers)
        true_prob = 1 / (1 + np.exp(-(self._logit_without_intercept(users, ads, hours) + self.intercept)))
        label = (rng.random(n) < true_prob).astype(np.int8)
        day = start_day + rng.integers(0, days, n)
        timestamp = _EPOCH + day * _DAY + hours * 3600 + rng.integers(0, 3600, n)
        u_obs = self.user_latent[users] + 0.3 * rng.standard_normal((n, LATENT_DIM))
        a_obs = self.ad_latent[ads] + 0.3 * rng.standard_normal((n, LATENT_DIM))
        columns: dict[str, np.ndarray] = {
            CLICK_ID: np.char.add(id_prefix, np.arange(n).astype(str)).astype(object),
            USER_ID: users.astype(np.int64),
            AD_ID: ads.astype(np.int64),
            ADVERTISER_ID: self.ad_advertiser[ads].astype(np.int64),
            "user_segment": np.argmax(self.user_latent[users][:, :4], axis=1).astype(np.int64),
            "user_geo": self.user_geo[users].astype(np.int64),
            "user_device": self.user_device[users].astype(np.int64),
            "ad_category": np.argmax(self.ad_latent[ads][:, :6], axis=1).astype(np.int64),
            "ad_format": self.ad_format[ads].astype(np.int64),
        }
        for i in range(LATENT_DIM):
            columns[f"user_dense_{i}"] = u_obs[:, i].astype(np.float32)
            columns[f"ad_dense_{i}"] = a_obs[:, i].astype(np.float32)
        columns["hour_sin"] = np.sin(2 * np.pi * hours / 24).astype(np.float32)
        columns["hour_cos"] = np.cos(2 * np.pi * hours / 24).astype(np.float32)
        columns[TIMESTAMP] = timestamp.astype(np.int64)
        columns[LABEL] = label
        columns[TRUE_PROB] = true_prob
        columns["_user_index"] = users
        return columns


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)


def _feature_table(columns: dict[str, np.ndarray], *, with_truth: bool) -> pa.Table:
    names = list(FEATURE_COLUMNS) + ([LABEL, TRUE_PROB] if with_truth else [])
    return pa.table({name: columns[name] for name in names})


def _conversion_table(world: World, rng: np.random.Generator, columns: dict[str, np.ndarray]) -> pa.Table:
    label = columns[LABEL]
    kind = rng.choice(np.arange(1, len(CONVERSION_TYPES)), len(label), p=_CONVERSION_TYPE_MIX)
    conversion_type = np.array(CONVERSION_TYPES, dtype=object)[np.where(label == 1, kind, 0)]
    delay = (rng.exponential(_DAY, len(label)) * label).astype(np.int64)
    return pa.table(
        {
            CLICK_ID: columns[CLICK_ID],
            CONVERTED: label,
            CONVERSION_TYPE: conversion_type,
            TIMESTAMP: columns[TIMESTAMP] + delay,
            CONSENT: world.user_consent[columns["_user_index"]],
        }
    )


def synthesize(out_dir: Path, config: WorldConfig) -> dict:
    """Generate the world into ``out_dir`` (which must not exist) and return its summary.

    Files are written into a temporary sibling directory that is renamed into place
    at the end, so an interrupted run leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose a new --out directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    world = World(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        summary = _write_world(world, staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _write_world(world: World, out: Path) -> dict:
    config = world.config
    (out / "platform" / "features").mkdir(parents=True)
    rng = np.random.default_rng([config.seed, 1])
    positives = 0
    with pq.ParquetWriter(out / "platform" / "pretrain.parquet", _pretrain_schema()) as writer:
        for start, n in _chunks(config.n_pretrain, config.chunk_rows):
            cols = world.clicks(
                rng, n, advertisers=world.platform_advertiser_ids, start_day=0, days=30, id_prefix=f"p{start}-"
            )
            positives += int(cols[LABEL].sum())
            writer.write_table(_feature_table(cols, with_truth=True))
    pretrain_rate = positives / config.n_pretrain

    clean_rooms = []
    per_advertiser = [config.rows // config.advertisers + (k < config.rows % config.advertisers) for k in range(config.advertisers)]
    for k, advertiser_id in enumerate(world.clean_room_advertiser_ids):
        (out / f"advertiser_{k}").mkdir()
        feature_path = out / "platform" / "features" / f"advertiser_{k}.parquet"
        conversion_path = out / f"advertiser_{k}" / "conversions.parquet"
        positives = 0
        with pq.ParquetWriter(feature_path, _feature_schema()) as features, pq.ParquetWriter(
            conversion_path, _conversion_schema()
        ) as conversions:
            for start, n in _chunks(per_advertiser[k], config.chunk_rows):
                cols = world.clicks(
                    rng, n, advertisers=np.array([advertiser_id]), start_day=30, days=28, id_prefix=f"a{k}-{start}-"
                )
                positives += int(cols[LABEL].sum())
                features.write_table(_feature_table(cols, with_truth=False))
                conversions.write_table(_conversion_table(world, rng, cols))
        clean_rooms.append(
            {"index": k, "advertiser_id": int(advertiser_id), "rows": per_advertiser[k], "base_rate": positives / per_advertiser[k]}
        )

    labels, probs = [], []
    with pq.ParquetWriter(out / "holdout.parquet", _pretrain_schema()) as writer:
        for start, n in _chunks(config.n_holdout, config.chunk_rows):
            cols = world.clicks(
                rng, n, advertisers=world.clean_room_advertiser_ids, start_day=58, days=2, id_prefix=f"h{start}-"
            )
            labels.append(cols[LABEL])
            probs.append(cols[TRUE_PROB])
            writer.write_table(_feature_table(cols, with_truth=True))
    label, prob = np.concatenate(labels), np.concatenate(probs)
    summary = {
        "config": dataclasses.asdict(config),
        "intercept": world.intercept,
        "pretrain": {"rows": config.n_pretrain, "base_rate": pretrain_rate},
        "clean_rooms": clean_rooms,
        "holdout": {
            "rows": config.n_holdout,
            "base_rate": float(label.mean()),
            "oracle_auc": float(roc_auc_score(label, prob)) if 0 < label.sum() < len(label) else None,
        },
    }
    for k in range(config.advertisers):
        world_spec(out, config, advertiser=k).write()
    world_spec(out, config, advertiser=None).write()
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def advertiser_spec_path(world_dir: Path, advertiser: int) -> Path:
    """Where the world keeps the dataset spec of advertiser ``advertiser``'s data."""
    return Path(world_dir) / f"advertiser_{int(advertiser)}.toml"


def holdout_spec_path(world_dir: Path) -> Path:
    """Where the world keeps the dataset spec of its holdout (true labels: simulation only)."""
    return Path(world_dir) / "holdout.toml"


def _buckets(config: WorldConfig) -> dict[str, int]:
    """Hash buckets per categorical column: the users as many as there are; 4x the cardinality for the rest."""
    advertisers = config.platform_advertisers + config.advertisers
    cardinality = {AD_ID: advertisers * config.ads_per_advertiser, ADVERTISER_ID: advertisers, **_CARDINALITY}
    return {USER_ID: config.users, **{name: 4 * n for name, n in cardinality.items()}}


def _features(log: Path, config: WorldConfig) -> FeatureSpec:
    buckets = _buckets(config)
    return FeatureSpec(
        paths=(Path(log),),
        format=Format.PARQUET,
        click_id=CLICK_ID,
        categorical=tuple(CategoricalColumn(name, buckets[name], CategoricalMissing.ERROR) for name in CATEGORICAL_FIELDS),
        dense=tuple(DenseColumn(name) for name in DENSE_FIELDS),
        chunk_rows=config.chunk_rows,
    )


def holdout_spec(holdout: Path, *, source: Path, config: WorldConfig) -> DatasetSpec:
    """The spec of a holdout file of this world: its feature columns, and its true labels as [pretrain]."""
    labels = LabelSpec((Path(holdout),), Format.PARQUET, LABEL, ("1",), ("0",))
    return DatasetSpec(source=Path(source), features=_features(holdout, config), pretrain=labels)


def world_spec(world_dir: Path, config: WorldConfig, *, advertiser: int | None) -> DatasetSpec:
    """The spec of advertiser ``advertiser``'s data (its feature log, the platform's pretraining data, its
    conversions), or with ``advertiser=None`` of the holdout (:func:`holdout_spec`)."""
    world_dir = Path(world_dir)
    if advertiser is None:
        return holdout_spec(world_dir / "holdout.parquet", source=holdout_spec_path(world_dir), config=config)
    features = _features(world_dir / "platform" / "features" / f"advertiser_{advertiser}.parquet", config)
    pretrain = LabelSpec((world_dir / "platform" / "pretrain.parquet",), Format.PARQUET, LABEL, ("1",), ("0",))
    conversions = ConversionSpec(
        paths=(world_dir / f"advertiser_{advertiser}" / "conversions.parquet",),
        format=Format.PARQUET,
        click_id=CLICK_ID,
        label=CONVERTED,
        positive=("1",),
        negative=("0",),
        consent=CONSENT,
        consent_levels=tuple((level.value, level) for level in ConsentLevel),
        timestamp=TIMESTAMP,
    )
    return DatasetSpec(source=advertiser_spec_path(world_dir, advertiser), features=features, pretrain=pretrain, conversions=conversions)


def _feature_schema() -> pa.Schema:
    fields = [pa.field(CLICK_ID, pa.string())]
    fields += [pa.field(name, pa.int64()) for name in CATEGORICAL_FIELDS]
    fields += [pa.field(name, pa.float32()) for name in DENSE_FIELDS]
    fields += [pa.field(TIMESTAMP, pa.int64())]
    return pa.schema(fields)


def _pretrain_schema() -> pa.Schema:
    return _feature_schema().append(pa.field(LABEL, pa.int8())).append(pa.field(TRUE_PROB, pa.float64()))


def _conversion_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field(CLICK_ID, pa.string()),
            pa.field(CONVERTED, pa.int8()),
            pa.field(CONVERSION_TYPE, pa.string()),
            pa.field(TIMESTAMP, pa.int64()),
            pa.field(CONSENT, pa.string()),
        ]
    )
