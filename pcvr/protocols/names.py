"""Names that arrive from another party (a label set, a run name) and become part of a path.

A name is a plain word: letters, digits and ``_ . , = + - :``, starting with a
letter or digit, at most 64 characters, with no ``..``. It can never be an
absolute path, climb out of a directory or name a sub-folder; and
:func:`resolve_inside` also refuses a path that a symlink leads outside its root.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["NAME_PATTERN", "check_name", "resolve_inside"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+:-]{0,63}")


def check_name(name: object, *, what: str) -> str:
    """``name`` if it is a plain name; raises ``ValueError`` saying ``what`` it was otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not a plain name (letters, digits and _ . , = + - :, up to 64, no '..')"
        )
    return name


def resolve_inside(root: Path, *names: str, what: str) -> Path:
    """``root / names…`` after checking every name, refused if it resolves (through symlinks) outside ``root``."""
    for name in names:
        check_name(name, what=what)
    base = Path(root).resolve()
    path = Path(root).joinpath(*names).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{what} {'/'.join(names)!r} leads outside {root} (through a symbolic link)")
    return path
