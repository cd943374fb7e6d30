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
        """Validate a parsed TOML document; paths resolve against ``source``'s directory (:func:`pcvr.data.spec_toml.parse`)."""
        from pcvr.data.spec_toml import parse

        return parse(document, source=Path(source))

    def require(self, section: str) -> Any:
        """The section named ``section`` (features / pretrain / conversions), or a ValueError naming it."""
        value = getattr(self, section, None)
        if section not in ("features", "pretrain", "conversions"):
            raise ValueError(f"unknown dataset spec section {section!r}")
        if value is None:
            raise ValueError(f"spec {self.source}: no [{section}] section")
        return value

    def to_toml(self) -> str:
        """The spec as TOML, paths relative to the directory of :attr:`source` (:func:`pcvr.data.spec_toml.dump`)."""
        from pcvr.data.spec_toml import dump

        return dump(self)

    def write(self) -> None:
        """Write :meth:`to_toml` to :attr:`source` atomically."""
        from pcvr.data.io import write_bytes_atomic

        write_bytes_atomic(self.source, self.to_toml().encode())
