"""Keyed pseudonyms and keyed randomness (HMAC-SHA256, via ``cryptography``).

* Join keys: HMAC(join_secret, click_id). The join secret is agreed between the
  advertiser and the platform; the clean room sees only the 32-byte digests, never
  a raw click id.
* Randomized-response draws: HMAC(rr_secret, "rr" ‖ join_key) read as a uniform in
  [0, 1). The RR secret is the advertiser's alone, so the platform cannot predict
  which labels flipped, and a rerun draws the same value for the same record:
  each label is randomized exactly once, whatever the number of epochs or reruns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes, hmac

__all__ = ["SECRET_BYTES", "pseudonymous_keys", "prf_uniforms", "load_or_create_secret"]

SECRET_BYTES = 32
_RR_DOMAIN = b"pcvr/randomized-response/v1|"


def _mac(secret: bytes) -> hmac.HMAC:
    if len(secret) < 16:
        raise ValueError(f"HMAC secrets must be at least 16 bytes; got {len(secret)}")
    return hmac.HMAC(secret, hashes.SHA256())


def pseudonymous_keys(click_ids: Iterable[str], *, secret: bytes) -> list[bytes]:
    """HMAC-SHA256 digests (32 bytes each) of the click ids under the join secret."""
    base = _mac(secret)
    keys = []
    for click_id in click_ids:
        mac = base.copy()
        mac.update(click_id.encode("utf-8"))
        keys.append(mac.finalize())
    return keys


def prf_uniforms(record_keys: Iterable[bytes], *, secret: bytes, domain: bytes = _RR_DOMAIN) -> np.ndarray:
    """One uniform draw in [0, 1) per record, keyed by ``secret`` (by default the advertiser's RR secret).

    The top 53 bits of HMAC(secret, domain ‖ key) give a float64 with every value
    k / 2^53 equally likely, so P(u < ρ) = ρ up to 2^-53. Each use has its own
    ``domain``, so draws made for one purpose say nothing about another's.
    """
    base = _mac(secret)
    base.update(domain)
    words = []
    for key in record_keys:
        mac = base.copy()
        mac.update(key)
        words.append(int.from_bytes(mac.finalize()[:8], "big") >> 11)
    return np.asarray(words, dtype=np.float64) / float(1 << 53)


def load_or_create_secret(path: Path) -> bytes:
    """Read a secret from ``path``, creating it (mode 0600) with fresh random bytes if absent."""
    path = Path(path)
    if path.exists():
        secret = path.read_bytes()
        if len(secret) < 16:
            raise ValueError(f"{path}: secret is {len(secret)} bytes; at least 16 are needed")
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return secret
