"""The clean room's held-out evaluation split, drawn inside the clean room.

A joined row goes to the evaluation split when a keyed PRF of its join key,
HMAC-SHA256(holdout key, domain ‖ join key) read as a uniform in [0, 1)
(:func:`pcvr.protocols.keys.prf_uniforms`), falls below ``fraction``. So:

* the split is deterministic: a rerun of the join with the same key gives the
  same rows, and a row never moves between training and evaluation;
* the key is the clean room's own (never sent), so the platform, which can compute
  every join key, cannot tell which rows are held out;
* rows held out never enter a gradient: the model is scored on rows it was not
  trained on (:mod:`pcvr.clean_room.evaluate`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pcvr.data import schema
from pcvr.data.readers import split_keys
from pcvr.protocols.keys import prf_uniforms

__all__ = ["HOLDOUT_FRACTION", "holdout_mask", "split_holdout"]

HOLDOUT_FRACTION = 0.1
_DOMAIN = b"pcvr/clean-room-holdout/v1|"


def holdout_mask(keys: np.ndarray | list[bytes], *, fraction: float, seed_key: bytes) -> np.ndarray:
    """Whether each join key's row is held out (bool [N]).

    Args:
        keys: 32-byte join keys, as ``bytes`` or a numpy ``S32`` array.
        fraction: the expected share of rows held out, in (0, 1).
        seed_key: the clean room's holdout secret (at least 16 bytes).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1); got {fraction!r}")
    if isinstance(keys, np.ndarray):
        keys = split_keys(keys)
    return prf_uniforms(keys, secret=seed_key, domain=_DOMAIN) < fraction


def split_holdout(table: pa.Table, *, fraction: float, seed_key: bytes) -> tuple[pa.Table, pa.Table]:
    """(train rows, evaluation rows) of a table with a :data:`~pcvr.data.schema.JOIN_KEY` column, each in its row order."""
    held_out = holdout_mask(table.column(schema.JOIN_KEY).to_pylist(), fraction=fraction, seed_key=seed_key)
    return table.filter(pa.array(~held_out)), table.filter(pa.array(held_out))
