"""A dataset spec to and from TOML: the validating parser behind :meth:`DatasetSpec.load`, and the writer.

Every parse error is a one-line ``ValueError`` naming the spec file and the dotted
key (``features.categorical[2].buckets``), as :mod:`pcvr.data.spec` documents.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcvr.data.schema import ConsentLevel
from pcvr.data.spec import (
    CRITEO_COLUMNS,
    CRITEO_ROW,
    DEFAULT_CHUNK_ROWS,
    CategoricalColumn,
    CategoricalMissing,
    ConversionSpec,
    DatasetSpec,
    DenseColumn,
    DenseMissing,
    FeatureSpec,
    Format,
    LabelSpec,
    Transform,
)

__all__ = ["parse", "dump"]


def parse(document: dict, *, source: Path) -> DatasetSpec:
    """Validate a parsed TOML document into a :class:`DatasetSpec`; paths resolve against ``source``'s directory.

    Raises:
        ValueError: unknown key, wrong type or value (one line naming ``source`` and the dotted key).
    """
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
    return DatasetSpec(source=Path(source), features=features, pretrain=pretrain, conversions=conversions)


def dump(spec: DatasetSpec) -> str:
    """The spec as TOML, paths relative to the directory of ``spec.source``."""
    base = spec.source.parent
    lines: list[str] = []

    def paths(values: tuple[Path, ...]) -> str:
        relative = [os.path.relpath(p, base) for p in values]
        return _toml(relative[0] if len(relative) == 1 else relative)

    if spec.features is not None:
        f = spec.features
        lines += ["[features]", f"path = {paths(f.paths)}", f"format = {_toml(f.format.value)}", f"click_id = {_toml(f.click_id)}"]
        if f.default_buckets is not None:
            lines.append(f"default_buckets = {f.default_buckets}")
        lines.append(f"chunk_rows = {f.chunk_rows}")
        for c in f.categorical:
            lines += ["", "[[features.categorical]]", f"column = {_toml(c.column)}", f"buckets = {c.buckets}", f"missing = {_toml(c.missing.value)}"]
        for d in f.dense:
            lines += ["", "[[features.dense]]", f"column = {_toml(d.column)}", f"transform = {_toml(d.transform.value)}", f"missing = {_toml(d.missing.value)}"]
        lines.append("")
    for name, section in (("pretrain", spec.pretrain), ("conversions", spec.conversions)):
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
