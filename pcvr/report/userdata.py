"""``pcvr report --spec``: the report on a user's own files instead of the synthetic world.

Whoever runs a report on their own data holds both sides of it (a click log and the
conversions it joins), so the report simulates the parties on those files: the platform
pretrains on the first spec's ``[pretrain]``, each spec is one advertiser and its clean
room. To measure accuracy with true labels, a share of each advertiser's clicks
(:data:`HOLDOUT_FRACTION`, drawn by a keyed hash of the click id with the report's own
secret) is held out: those clicks are removed from the feature log the platform exports,
so they never reach a clean room, and their true labels — of users who did not opt out —
form the platform's evaluation holdout. The clean rooms' private evaluation (on their own
held-out split of the rows they train on) is reported beside, as for the synthetic world.

Laid out as the synthetic world is (:mod:`pcvr.data.synth`: one spec per advertiser and
one for the holdout, beside the data), in the report's base work directory, so every
cell takes the same path as on the synthetic world. The import is keyed by a digest of
the specs and every data file they name; a changed file makes a new import, and the
cells' cache keys carry the digest, so nothing is reused across changed inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcvr.data.io import write_json_atomic
from pcvr.data.readers import Role, click_ids, data_files, iter_chunks, label_values, map_values
from pcvr.data.schema import ConsentLevel
from pcvr.data.spec import CRITEO_ROW, DatasetSpec, FeatureSpec, Format, LabelSpec
from pcvr.data.synth import WorldConfig, advertiser_spec_path, holdout_spec_path
from pcvr.protocols.keys import load_or_create_secret

__all__ = ["HOLDOUT_FRACTION", "UserData", "load_user_data", "import_user_data"]

HOLDOUT_FRACTION = 0.1  # of each advertiser's clicks, kept out of training for the true-label figures
CLICK_ID = "pcvr_click_id"  # the click id column of the imported feature files (a string)
LABEL = "pcvr_label"  # the true label column of the holdout files
_CHUNK_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class UserData:
    """A user's dataset specs, validated, and a digest of everything they read."""

    specs: tuple[DatasetSpec, ...]
    digest: str

    @property
    def advertisers(self) -> int:
        return len(self.specs)


def load_user_data(paths: Sequence[Path]) -> UserData:
    """Parse and check the specs ``--spec`` names; nothing is written.

    Raises:
        ValueError: an unreadable or invalid spec, a spec without ``[features]`` or
            ``[conversions]``, a first spec without ``[pretrain]``, feature columns that
            differ between specs, or a data file that does not exist (one line, naming it).
    """
    specs = tuple(DatasetSpec.load(Path(path)) for path in paths)
    if not specs:
        raise ValueError("--spec: give one dataset spec per advertiser")
    first = specs[0]
    first.require("pretrain")
    for spec in specs:
        features, conversions = spec.require("features"), spec.require("conversions")
        if features.digest() != first.require("features").digest():
            raise ValueError(
                f"spec {spec.source}: [features] columns differ from {first.source}'s; every advertiser's clicks "
                "must have the platform's feature columns"
            )
        data_files(features.paths, features.format)
        data_files(conversions.paths, conversions.format)
    return UserData(specs=specs, digest=_digest(specs))


def _digest(specs: Sequence[DatasetSpec]) -> str:
    """SHA-256 over each spec file and every data file it reads, by content."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(Path(spec.source).read_bytes())
        sections = [spec.features, spec.conversions, spec.pretrain]
        for section in filter(None, sections):
            for path in data_files(section.paths, section.format):
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def _held_out(ids: Sequence[str], *, secret: bytes) -> np.ndarray:
    """Which click ids are held out: HMAC-SHA256(secret, id) read as a uniform number below the fraction."""
    threshold = int(HOLDOUT_FRACTION * 2**64)
    return np.fromiter(
        (int.from_bytes(hmac.new(secret, i.encode(), hashlib.sha256).digest()[:8], "big") < threshold for i in ids),
        dtype=bool,
        count=len(ids),
    )


def _feature_roles(features: FeatureSpec) -> dict[str, Role]:
    roles = {c.column: Role.CATEGORICAL for c in features.categorical} | {d.column: Role.DENSE for d in features.dense}
    if not (features.format is Format.CRITEO_TSV and features.click_id == CRITEO_ROW):
        roles = {features.click_id: Role.CLICK_ID, **roles}
    return roles


def _true_labels(spec: DatasetSpec, wanted: set[str]) -> dict[str, int]:
    """Click id → true label of the ``wanted`` clicks whose users did not opt out."""
    conversions = spec.require("conversions")
    roles = {name: Role.VALUE for name in conversions.columns}
    if conversions.click_id in roles:
        roles[conversions.click_id] = Role.CLICK_ID
    if conversions.timestamp is not None:
        roles[conversions.timestamp] = Role.TIMESTAMP
    levels = list(ConsentLevel)
    labels: dict[str, int] = {}
    for chunk in iter_chunks(conversions.paths, fmt=conversions.format, columns=roles, chunk_rows=_CHUNK_ROWS):
        ids = click_ids(chunk, conversions.click_id, conversions.format)
        values = label_values(chunk, conversions.label, positive=conversions.positive, negative=conversions.negative)
        if conversions.consent is not None:
            mapping = {value: levels.index(level) for value, level in conversions.consent_levels or ()}
            consent = [levels[i] for i in map_values(chunk, conversions.consent, mapping)]
        else:
            consent = [conversions.consent_level or ConsentLevel.STANDARD] * len(ids)
        for click, label, level in zip(ids, values.tolist(), consent):
            if click in wanted and level is not ConsentLevel.OPT_OUT:
                labels[click] = label
    return labels


def _imported_schema(features: FeatureSpec) -> pa.Schema:
    """One schema for every imported file: categorical values as strings (they are hashed by their
    string form, so nothing changes), dense values as float64; files of any format then agree."""
    fields = [pa.field(CLICK_ID, pa.string())]
    fields += [pa.field(c.column, pa.string()) for c in features.categorical]
    return pa.schema(fields + [pa.field(d.column, pa.float64()) for d in features.dense])


def _split_clicks(spec: DatasetSpec, out: Path, *, secret: bytes) -> tuple[Path, pa.Table, int]:
    """Write the clicks that train to ``out`` (Parquet); return them, the held-out clicks' rows, and the count kept."""
    features = spec.require("features")
    roles, schema = _feature_roles(features), _imported_schema(features)
    kept, held, writer = 0, [], None
    try:
        for chunk in iter_chunks(features.paths, fmt=features.format, columns=roles, chunk_rows=_CHUNK_ROWS):
            ids = click_ids(chunk, features.click_id, features.format)
            columns = [pa.array(ids, type=pa.string())]
            columns += [chunk.table.column(name).cast(field.type) for name, field in zip(features.columns, list(schema)[1:])]
            table = pa.Table.from_arrays(columns, schema=schema)
            mask = _held_out(ids, secret=secret)
            train = table.filter(pa.array(~mask))
            if writer is None:
                out.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(out, schema)
            writer.write_table(train)
            kept += train.num_rows
            held.append(table.filter(pa.array(mask)))
    finally:
        if writer is not None:
            writer.close()
    return out, pa.concat_tables(held), kept


def _bring(section, directory: Path):
    """``section`` (a spec's [pretrain] or [conversions]) naming copies of its files inside ``directory``.

    The world is then one self-contained tree: each cell links it elsewhere, and the specs'
    relative paths still hold. Files are hard-linked where the file system allows.
    """
    directory.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, path in enumerate(data_files(section.paths, section.format)):
        target = directory / f"{i:03d}-{path.name}"
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        copies.append(target)
    return dataclasses.replace(section, paths=tuple(copies))


def _config(summary: dict) -> WorldConfig:
    stored = summary["config"]
    return WorldConfig(**{k: (tuple(map(tuple, v)) if k == "consent_mix" else v) for k, v in stored.items()})


def import_user_data(data: UserData, world_dir: Path, *, secret_file: Path) -> WorldConfig:
    """Lay ``data`` out in ``world_dir`` as a world the report's cells run on (see the module docstring).

    A ``world_dir`` holding this very import is kept; one holding anything else is replaced.
    Returns the world's config (its advertisers and training rows) for the grid.
    """
    world_dir = Path(world_dir)
    summary_path = world_dir / "world.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("user_data", {}).get("digest") == data.digest:
            return _config(summary)
    shutil.rmtree(world_dir.parent, ignore_errors=True)  # the base built on other inputs: every artifact of it goes
    secret = load_or_create_secret(secret_file)
    staging = world_dir.with_name(world_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        return _import(data, world_dir, staging, secret=secret)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays
        raise


def _import(data: UserData, world_dir: Path, staging: Path, *, secret: bytes) -> WorldConfig:
    features0 = data.specs[0].require("features")
    pretrain = _bring(data.specs[0].require("pretrain"), staging / "pretrain")
    held_tables, kept_total = [], 0
    for k, spec in enumerate(data.specs):
        train_file, held, kept = _split_clicks(spec, staging / f"advertiser_{k}" / "features.parquet", secret=secret)
        labels = _true_labels(spec, set(held.column(CLICK_ID).to_pylist()))
        keep = np.array([i in labels for i in held.column(CLICK_ID).to_pylist()], dtype=bool)
        held = held.filter(pa.array(keep))
        held = held.append_column(LABEL, pa.array([labels[i] for i in held.column(CLICK_ID).to_pylist()], type=pa.int8()))
        if held.num_rows == 0:
            raise ValueError(f"spec {spec.source}: no labelled click fell into the report's holdout; give more rows")
        held_tables.append(held)
        kept_total += kept
        imported = dataclasses.replace(spec.require("features"), paths=(train_file,), format=Format.PARQUET, click_id=CLICK_ID)
        DatasetSpec(
            source=advertiser_spec_path(staging, k),
            features=imported,
            pretrain=pretrain,
            conversions=_bring(spec.require("conversions"), staging / f"advertiser_{k}" / "conversions"),
        ).write()
    held = pa.concat_tables(held_tables)
    held_file = staging / "holdout.parquet"
    pq.write_table(held, held_file)
    DatasetSpec(
        source=holdout_spec_path(staging),
        features=dataclasses.replace(features0, paths=(held_file,), format=Format.PARQUET, click_id=CLICK_ID),
        pretrain=LabelSpec((held_file,), Format.PARQUET, LABEL, ("1",), ("0",)),
    ).write()
    summary = {
            "config": dataclasses.asdict(WorldConfig(rows=kept_total, advertisers=data.advertisers)),
            "user_data": {
                "digest": data.digest,
                "specs": [str(spec.source) for spec in data.specs],
                "holdout_fraction": HOLDOUT_FRACTION,
                "holdout_rows": held.num_rows,
            },
    }
    write_json_atomic(staging / "world.json", summary)
    world_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(world_dir)
    return _config(json.loads((world_dir / "world.json").read_text(encoding="utf-8")))
