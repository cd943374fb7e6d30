"""Prepared state keyed by its inputs: an artifact is reused only if what produced it is unchanged.

Each prepared artifact (a file or a folder) gets a record beside it,
``<name>.inputs.json``: one SHA-256 digest per named input — a file's bytes, a
secret's bytes, or a JSON-able value such as a policy or a model config. Secrets
are recorded only as digests. :func:`prepare_artifact` builds the artifact when it
is missing, has no record, or any input changed (or, for an artifact that must not
be silently rebuilt, stops with one line naming what changed), then writes the
record atomically. The old record is removed before a rebuild starts, so an
interrupted rebuild is never mistaken for a finished one.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from pcvr.data.io import DataError, write_json_atomic

__all__ = ["OnChange", "input_digests", "record_path", "prepare_artifact", "require_secret"]

_SUFFIX = ".inputs.json"
_CHUNK = 1 << 20


class OnChange(enum.Enum):
    """What to do with an artifact whose inputs changed."""

    REBUILD = "rebuild"
    REFUSE = "refuse"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(value: object) -> str:
    if isinstance(value, Path):
        if value.is_dir():
            parts = [f"{p.relative_to(value)}:{_file_digest(p)}" for p in sorted(value.rglob("*")) if p.is_file()]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return _file_digest(value)
    if isinstance(value, bytes):
        return hashlib.sha256(b"bytes:" + value).hexdigest()
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def input_digests(inputs: Mapping[str, object]) -> dict[str, str]:
    """Name → SHA-256 of each input (a ``Path`` by its content; ``bytes`` as is; anything else as JSON)."""
    return {name: _digest(value) for name, value in inputs.items()}


def record_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + _SUFFIX)


def _read_record(path: Path) -> dict[str, str] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def prepare_artifact(
    artifact: Path,
    inputs: Mapping[str, object],
    build: Callable[[], object],
    *,
    on_change: OnChange = OnChange.REBUILD,
) -> bool:
    """Build ``artifact`` with ``build()`` unless it exists with a record of exactly ``inputs``.

    Returns whether it was built.

    Raises:
        DataError: ``on_change`` is ``REFUSE`` and the artifact was made from other inputs.
    """
    artifact = Path(artifact)
    digests = input_digests(inputs)
    record_file = record_path(artifact)
    record = _read_record(record_file)
    if artifact.exists() and record == digests:
        return False
    if artifact.exists() and record is not None and on_change is OnChange.REFUSE:
        changed = sorted(name for name in digests.keys() | record.keys() if record.get(name) != digests.get(name))
        raise DataError(f"{artifact}: prepared from other inputs ({', '.join(changed)} changed); use a new --work-dir")
    record_file.unlink(missing_ok=True)
    build()
    write_json_atomic(record_file, digests)
    return True


def require_secret(path: Path, *, made_with_it: list[Path]) -> None:
    """Refuse to go on when the secret at ``path`` is missing but data made with it exists.

    A new secret next to data made with the old one would silently mismatch it (join
    keys), or randomize labels a second time (the RR key).
    """
    path = Path(path)
    if path.exists():
        return
    existing = [p for p in made_with_it if p.exists()]
    if existing:
        raise DataError(f"{path}: secret is missing, but {existing[0]} was made with it; restore it or use a new --work-dir")
