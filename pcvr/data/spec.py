"""The dataset spec: which files hold what, and how each column becomes a model input.

A spec is a TOML file, parsed once into one frozen dataclass tree. Paths are
relative to the spec file's directory. A spec holds any subset of three sections;
each step requires the sections it needs (:meth:`DatasetSpec.require`)::

    [features]                      # the platform's click log (pretraining data has the same columns)
    path = "clicks.csv"             # a path, a list of paths, or a directory of Parquet files
    format = "csv"                  # csv | parquet | criteo-tsv
    click_id = "click_id"           # criteo-tsv: "row", the 0-based line number over the files in order
    default_buckets = 10000         # buckets of a categorical column that gives none
    chunk_rows = 262144             # optional: rows per streamed chunk

    [[features.categorical]]        # any type (int or string), hashed per column
    column = "user"
    buckets = 50000                 # optional
    missing = "bucket"              # bucket (missing values share one bucket; default) | error

    [[features.dense]]
    column = "price"
    transform = "log1p"             # none (default) | log1p | standardize
    missing = "error"               # error (default) | zero | mean

    [pretrain]                      # the platform's own labelled rows
    path = "pretrain.csv"
    format = "csv"
    label = "clicked"
    positive = ["1"]
    negative = ["0"]                # optional: any other value is then an error

    [conversions]                   # the advertiser's file
    path = "conversions.csv"
    format = "csv"
    click_id = "click"
    label = "purchased"
    positive = ["yes", "1"]
    negative = ["no", "0"]          # optional, as above
    consent = "consent_given"       # a consent column and its value -> level map ...
    consent_levels = { full = "standard", partial = "limited", withdrawn = "opt_out" }
    # consent_level = "standard"    # ... or one level for every row
    timestamp = "ts"                # optional

Every error is a one-line ``ValueError`` naming the spec file and the key.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcvr.data.schema import ConsentLevel

__all__ = [
    "CRITEO_COLUMNS",
    "CRITEO_ROW",
    "DEFAULT_CHUNK_ROWS",
    "CategoricalColumn",
    "CategoricalMissing",
    "ConversionSpec",
    "DatasetSpec",
    "DenseColumn",
    "DenseMissing",
    "FeatureSpec",
    "Format",
    "LabelSpec",
    "Transform",
]

DEFAULT_CHUNK_ROWS = 262_144
CRITEO_ROW = "row"
CRITEO_LABEL = "label"
CRITEO_INTEGERS = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICALS = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = (CRITEO_LABEL, *CRITEO_INTEGERS, *CRITEO_CATEGORICALS)


class Format(enum.Enum):
    """How a data file is laid out."""

    CSV = "csv"
    PARQUET = "parquet"
    CRITEO_TSV = "criteo-tsv"  # tab-separated, no header: label, I1..I13, C1..C26


class Transform(enum.Enum):
    """What a dense column goes through before the model sees it."""

    NONE = "none"
    LOG1P = "log1p"  # sign(x) · log1p(|x|)
    STANDARDIZE = "standardize"  # (x − mean) / std, statistics of the platform's pretraining data


class CategoricalMissing(enum.Enum):
    """What a missing categorical value becomes."""

    BUCKET = "bucket"  # one bucket of its own, shared by every missing value of the column
    ERROR = "error"


class DenseMissing(enum.Enum):
    """What a missing dense value (null, NaN or ±inf) becomes."""

    ERROR = "error"
    ZERO = "zero"
    MEAN = "mean"  # the pretraining data's mean of the column


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical column, hashed into ``buckets`` buckets (plus one for missing values under ``BUCKET``)."""

    column: str
    buckets: int
    missing: CategoricalMissing = CategoricalMissing.BUCKET


@dataclass(frozen=True)
class DenseColumn:
    """A numeric column and its transform."""

    column: str
    transform: Transform = Transform.NONE
    missing: DenseMissing = DenseMissing.ERROR


@dataclass(frozen=True)
class FeatureSpec:
    """The platform's feature log and its model inputs."""

    paths: tuple[Path, ...]
    format: Format
    click_id: str
    categorical: tuple[CategoricalColumn, ...]
    dense: tuple[DenseColumn, ...]
    default_buckets: int | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    @property
    def columns(self) -> tuple[str, ...]:
        """The feature columns, categorical first, in the model's order."""
        return tuple(c.column for c in self.categorical) + tuple(d.column for d in self.dense)

    def digest(self) -> str:
        """SHA-256 of the feature columns' config (names, buckets, transforms, missing policies), not of paths or format."""
        document = {
            "categorical": [[c.column, c.buckets, c.missing.value] for c in self.categorical],
            "dense": [[d.column, d.transform.value, d.missing.value] for d in self.dense],
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class LabelSpec:
    """A labelled file (the platform's pretraining data): same feature columns plus a label."""

    paths: tuple[Path, ...]
    format: Format
    label: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ConversionSpec:
    """The advertiser's conversions: click id, label, consent (a column and its map, or one level)."""

    paths: tuple[Path, ...]
    format: Format
    click_id: str
    label: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] | None = None
    consent: str | None = None
    consent_levels: tuple[tuple[str, ConsentLevel], ...] | None = None
    consent_level: ConsentLevel | None = None
    timestamp: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns read from the file (the click id too, unless it is the criteo row number)."""
        names = [self.label] if self.click_id == CRITEO_ROW and self.format is Format.CRITEO_TSV else [self.click_id, self.label]
        names += [name for name in (self.consent, self.timestamp) if name is not None]
        return tuple(names)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec file; ``source`` is where it came from (named by every error)."""

    source: Path
    features: FeatureSpec | None = None
    pretrain: LabelSpec | None = None
    conversions: ConversionSpec | None = None

    @classmethod
    def load(cls, path: Path) -> "DatasetSpec":
        """Parse and validate the spec file at ``path``.

        Raises:
            ValueError: unreadable file, bad TOML, unknown key, wrong type or value (one line, naming the key).
        """
        path = Path(path)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read dataset spec: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return cls.from_dict(document, source=path)

    @classmethod
    def from_dict(cls, document: dict, *, source: Path) -> "DatasetSpec":
        """Validate a parsed TOML document; paths resolve against ``source``'s directory."""
        parser = _Parser(Path(source))
        parser.keys(document, "", required=(), optional=("features", "pretrain", "conversions"))
        if not document:
            raise ValueError(f"{source}: dataset spec has none of [features], [pretrain], [conversions]")
        features = parser.features(document["features"]) if "features" in document else None
        pretrain = parser.pretrain(document["pretrain"]) if "pretrain" in document else None
        conversions = parser.conversions(document["conversions"]) if "conversions" in document else None
        if pretrain is not None and features is None:
            raise ValueError(f"{source}: [pretrain] needs a [features] section (its feature columns)")
        if features is not None and pretrain is not None and pretrain.label in features.columns:
            raise ValueError(f"{source}: pretrain.label: {pretrain.label!r} is also a feature column")
        return cls(source=Path(source), features=features, pretrain=pretrain, conversions=conversions)

    def require(self, section: str) -> Any:
        """The section named ``section`` (features / pretrain / conversions), or a ValueError naming it."""
        value = getattr(self, section, None)
        if section not in ("features", "pretrain", "conversions"):
            raise ValueError(f"unknown dataset spec section {section!r}")
        if value is None:
            raise ValueError(f"spec {self.source}: no [{section}] section")
        return value

    def to_toml(self) -> str:
        """The spec as TOML, paths relative to the directory of :attr:`source`."""
        base = self.source.parent
        lines: list[str] = []

        def paths(values: tuple[Path, ...]) -> str:
            relative = [os.path.relpath(p, base) for p in values]
            return _toml(relative[0] if len(relative) == 1 else relative)

        if self.features is not None:
            f = self.features
            lines += ["[features]", f"path = {paths(f.paths)}", f"format = {_toml(f.format.value)}", f"click_id = {_toml(f.click_id)}"]
            if f.default_buckets is not None:
                lines.append(f"default_buckets = {f.default_buckets}")
            lines.append(f"chunk_rows = {f.chunk_rows}")
            for c in f.categorical:
                lines += ["", "[[features.categorical]]", f"column = {_toml(c.column)}", f"buckets = {c.buckets}", f"missing = {_toml(c.missing.value)}"]
            for d in f.dense:
                lines += ["", "[[features.dense]]", f"column = {_toml(d.column)}", f"transform = {_toml(d.transform.value)}", f"missing = {_toml(d.missing.value)}"]
            lines.append("")
        for name, section in (("pretrain", self.pretrain), ("conversions", self.conversions)):
            if section is None:
                continue
            lines += [f"[{name}]", f"path = {paths(section.paths)}", f"format = {_toml(section.format.value)}"]
            if isinstance(section, ConversionSpec):
                lines.append(f"click_id = {_toml(section.click_id)}")
            lines += [f"label = {_toml(section.label)}", f"positive = {_toml(list(section.positive))}"]
            if section.negative is not None:
                lines.append(f"negative = {_toml(list(section.negative))}")
            if isinstance(section, ConversionSpec):
                if section.consent is not None:
                    levels = ", ".join(f"{_toml(value)} = {_toml(level.value)}" for value, level in section.consent_levels or ())
                    lines += [f"consent = {_toml(section.consent)}", f"consent_levels = {{ {levels} }}"]
                else:
                    lines.append(f"consent_level = {_toml(section.consent_level.value)}")  # type: ignore[union-attr]
                if section.timestamp is not None:
                    lines.append(f"timestamp = {_toml(section.timestamp)}")
            lines.append("")
        return "\n".join(lines)

    def write(self) -> None:
        """Write :meth:`to_toml` to :attr:`source` atomically."""
        from pcvr.data.io import write_bytes_atomic

        write_bytes_atomic(self.source, self.to_toml().encode())


def _toml(value: object) -> str:
    """A TOML literal of a string or a list of strings (JSON's escaping is valid TOML basic-string escaping)."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


@dataclass
class _Parser:
    """Checks one document; every message names ``source`` and the dotted key."""

    source: Path

    def fail(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}")

    def keys(self, table: object, key: str, *, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
        if not isinstance(table, dict):
            raise self.fail(key, f"expected a table; got {type(table).__name__}")
        known = (*required, *optional)
        for name in table:
            if name not in known:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown key (expected one of {', '.join(known)})")
        for name in required:
            if name not in table:
                raise self.fail(f"{key}.{name}" if key else name, "missing required key")
        return table

    def string(self, table: dict, key: str, name: str) -> str:
        value = table[name]
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key}.{name}", f"expected a non-empty string; got {value!r}")
        return value

    def positive_int(self, table: dict, key: str, name: str) -> int:
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"{key}.{name}", f"expected a positive integer; got {value!r}")
        return value

    def enum(self, kind: type[enum.Enum], table: dict, key: str, name: str) -> Any:
        value = table[name]
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(member.value for member in kind)  # type: ignore[attr-defined]
            raise self.fail(f"{key}.{name}", f"unknown value {value!r} (expected one of {choices})") from None

    def paths(self, table: dict, key: str) -> tuple[Path, ...]:
        value = table["path"]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise self.fail(f"{key}.path", f"expected a path or a non-empty list of paths; got {value!r}")
        return tuple(self.source.parent / v for v in values)

    def values(self, table: dict, key: str, name: str) -> tuple[str, ...]:
        value = table[name]
        ok = isinstance(value, list) and value and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
        if not ok:
            raise self.fail(f"{key}.{name}", f"expected a non-empty list of strings or integers; got {value!r}")
        strings = tuple(str(v) for v in value)
        if len(set(strings)) != len(strings):
            raise self.fail(f"{key}.{name}", f"lists a value twice: {value!r}")
        return strings

    def label_values(self, table: dict, key: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        positive = self.values(table, key, "positive")
        negative = self.values(table, key, "negative") if "negative" in table else None
        both = sorted(set(positive) & set(negative or ()))
        if both:
            raise self.fail(f"{key}.negative", f"{', '.join(map(repr, both))} also listed in positive")
        return positive, negative

    def column_list(self, table: dict, key: str, name: str) -> list:
        value = table.get(name, [])
        if not isinstance(value, list) or (name in table and not value):
            raise self.fail(f"{key}.{name}", "expected a non-empty array of tables (omit the key for none)")
        return value

    def features(self, table: object) -> FeatureSpec:
        key = "features"
        table = self.keys(
            table, key, required=("path", "format", "click_id"), optional=("default_buckets", "chunk_rows", "categorical", "dense")
        )
        fmt = self.enum(Format, table, key, "format")
        click_id = self.string(table, key, "click_id")
        if fmt is Format.CRITEO_TSV and click_id != CRITEO_ROW:
            raise self.fail(f"{key}.click_id", f"a criteo-tsv file has no click id column; use {CRITEO_ROW!r} (the row number)")
        default_buckets = self.positive_int(table, key, "default_buckets") if "default_buckets" in table else None
        chunk_rows = self.positive_int(table, key, "chunk_rows") if "chunk_rows" in table else DEFAULT_CHUNK_ROWS
        categorical = []
        for i, entry in enumerate(self.column_list(table, key, "categorical")):
            where = f"{key}.categorical[{i}]"
            entry = self.keys(entry, where, required=("column",), optional=("buckets", "missing"))
            if "buckets" in entry:
                buckets = self.positive_int(entry, where, "buckets")
            elif default_buckets is not None:
                buckets = default_buckets
            else:
                raise self.fail(f"{where}.buckets", "missing, and [features] has no default_buckets")
            missing = self.enum(CategoricalMissing, entry, where, "missing") if "missing" in entry else CategoricalMissing.BUCKET
            categorical.append(CategoricalColumn(self.string(entry, where, "column"), buckets, missing))
        dense = []
        for i, entry in enumerate(self.column_list(table, key, "dense")):
            where = f"{key}.dense[{i}]"
            entry = self.keys(entry, where, required=("column",), optional=("transform", "missing"))
            transform = self.enum(Transform, entry, where, "transform") if "transform" in entry else Transform.NONE
            missing = self.enum(DenseMissing, entry, where, "missing") if "missing" in entry else DenseMissing.ERROR
            dense.append(DenseColumn(self.string(entry, where, "column"), transform, missing))
        if not categorical and not dense:
            raise self.fail(key, "lists no feature columns (add [[features.categorical]] or [[features.dense]])")
        spec = FeatureSpec(self.paths(table, key), fmt, click_id, tuple(categorical), tuple(dense), default_buckets, chunk_rows)
        seen: dict[str, str] = {} if fmt is Format.CRITEO_TSV else {click_id: f"{key}.click_id"}
        wheres = [f"{key}.categorical[{i}].column" for i in range(len(categorical))] + [
            f"{key}.dense[{i}].column" for i in range(len(dense))
        ]
        for name, where in zip(spec.columns, wheres):
            if name in seen:
                raise self.fail(where, f"column {name!r} already used by {seen[name]}")
            seen[name] = where
            self.criteo_column(fmt, name, where)
        return spec

    def criteo_column(self, fmt: Format, name: str, where: str) -> None:
        if fmt is Format.CRITEO_TSV and name not in CRITEO_COLUMNS:
            raise self.fail(where, f"{name!r} is not a criteo-tsv column (label, I1..I13, C1..C26)")

    def pretrain(self, table: object) -> LabelSpec:
        key = "pretrain"
        table = self.keys(table, key, required=("path", "format", "label", "positive"), optional=("negative",))
        fmt = self.enum(Format, table, key, "format")
        label = self.string(table, key, "label")
        self.criteo_column(fmt, label, f"{key}.label")
        positive, negative = self.label_values(table, key)
        return LabelSpec(self.paths(table, key), fmt, label, positive, negative)

    def conversions(self, table: object) -> ConversionSpec:
        key = "conversions"
        table = self.keys(
            table,
            key,
            required=("path", "format", "click_id", "label", "positive"),
            optional=("negative", "consent", "consent_levels", "consent_level", "timestamp"),
        )
        fmt = self.enum(Format, table, key, "format")
        click_id = self.string(table, key, "click_id")
        label = self.string(table, key, "label")
        positive, negative = self.label_values(table, key)
        if ("consent" in table) == ("consent_level" in table):
            raise self.fail(key, "give exactly one of consent (a column, with consent_levels) or consent_level (one level for all rows)")
        consent = consent_levels = consent_level = None
        if "consent" in table:
            consent = self.string(table, key, "consent")
            if "consent_levels" not in table:
                raise self.fail(f"{key}.consent_levels", "missing: needed with consent (each value's level)")
            mapping = table["consent_levels"]
            if not isinstance(mapping, dict) or not mapping:
                raise self.fail(f"{key}.consent_levels", f"expected a non-empty table of value = level; got {mapping!r}")
            consent_levels = tuple((value, self.enum(ConsentLevel, mapping, f"{key}.consent_levels", value)) for value in mapping)
        else:
            if "consent_levels" in table:
                raise self.fail(f"{key}.consent_levels", "only with consent (a column); consent_level applies one level to all rows")
            consent_level = self.enum(ConsentLevel, table, key, "consent_level")
        timestamp = self.string(table, key, "timestamp") if "timestamp" in table else None
        if fmt is Format.CRITEO_TSV and click_id != CRITEO_ROW:
            raise self.fail(f"{key}.click_id", f"a criteo-tsv file has no click id column; use {CRITEO_ROW!r} (the row number)")
        spec = ConversionSpec(self.paths(table, key), fmt, click_id, label, positive, negative, consent, consent_levels, consent_level, timestamp)
        names = {"click_id": click_id, "label": label, "consent": consent, "timestamp": timestamp}
        seen: dict[str, str] = {}
        for name, column in names.items():
            if column is None or (name == "click_id" and fmt is Format.CRITEO_TSV):
                continue
            if column in seen:
                raise self.fail(f"{key}.{name}", f"column {column!r} already used by {key}.{seen[column]}")
            seen[column] = name
            self.criteo_column(fmt, column, f"{key}.{name}")
        return spec
