"""Keyed pseudonyms and keyed uniforms (pcvr.protocols.keys), against a stdlib HMAC reference."""

from __future__ import annotations

import hashlib
import hmac
import math
import stat

import numpy as np
import pytest

from pcvr.protocols.keys import SECRET_BYTES, load_or_create_secret, prf_uniforms, pseudonymous_keys

JOIN_SECRET = b"join-secret-for-tests-0123456789"
RR_SECRET = b"rr-secret-for-tests-abcdefghijkl"
RR_DOMAIN = b"pcvr/randomized-response/v1|"  # pinned: changing it re-randomizes every label


def _reference_key(click_id: str, secret: bytes) -> bytes:
    return hmac.new(secret, click_id.encode("utf-8"), hashlib.sha256).digest()


def _reference_uniform(key: bytes, secret: bytes) -> float:
    digest = hmac.new(secret, RR_DOMAIN + key, hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


CLICK_IDS = ["c-0", "c-1", "00123", "", "clic\u00e9-\u2603", "x" * 300]


def test_pseudonymous_keys_match_stdlib_hmac():
    keys = pseudonymous_keys(CLICK_IDS, secret=JOIN_SECRET)
    assert keys == [_reference_key(c, JOIN_SECRET) for c in CLICK_IDS]
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)


def test_pseudonymous_keys_accept_numpy_object_arrays():
    ids = np.array(["a", "b", "c"], dtype=object)
    assert pseudonymous_keys(ids, secret=JOIN_SECRET) == pseudonymous_keys(["a", "b", "c"], secret=JOIN_SECRET)


def test_pseudonymous_keys_depend_on_secret_and_id():
    keys_a = pseudonymous_keys(CLICK_IDS, secret=JOIN_SECRET)
    keys_b = pseudonymous_keys(CLICK_IDS, secret=JOIN_SECRET[::-1])
    assert not set(keys_a) & set(keys_b)
    assert len(set(keys_a)) == len(CLICK_IDS)


def test_prf_uniforms_match_stdlib_reference():
    keys = pseudonymous_keys(CLICK_IDS, secret=JOIN_SECRET)
    uniforms = prf_uniforms(keys, secret=RR_SECRET)
    assert uniforms.dtype == np.float64
    np.testing.assert_array_equal(uniforms, [_reference_uniform(k, RR_SECRET) for k in keys])


def test_prf_uniforms_are_reproducible_and_keyed():
    keys = pseudonymous_keys([f"c{i}" for i in range(2000)], secret=JOIN_SECRET)
    first = prf_uniforms(keys, secret=RR_SECRET)
    np.testing.assert_array_equal(first, prf_uniforms(keys, secret=RR_SECRET))
    # Each draw depends on its own key only, not on its position or neighbours.
    np.testing.assert_array_equal(first[::-1], prf_uniforms(keys[::-1], secret=RR_SECRET))
    np.testing.assert_array_equal(first[5:7], prf_uniforms(keys[5:7], secret=RR_SECRET))
    other = prf_uniforms(keys, secret=RR_SECRET[::-1])
    assert (other != first).mean() > 0.99


def test_prf_uniforms_are_uniform_on_unit_interval():
    n = 20_000
    keys = pseudonymous_keys([f"u{i}" for i in range(n)], secret=JOIN_SECRET)
    uniforms = prf_uniforms(keys, secret=RR_SECRET)
    assert ((uniforms >= 0.0) & (uniforms < 1.0)).all()
    # Mean within 3.29 sigma of 1/2 (sigma^2 = 1/12 n), decile counts within 3.29 sigma of n/10.
    assert abs(uniforms.mean() - 0.5) < 3.29 * math.sqrt(1.0 / (12.0 * n))
    counts = np.histogram(uniforms, bins=10, range=(0.0, 1.0))[0]
    assert np.abs(counts - n / 10).max() < 3.29 * math.sqrt(n * 0.1 * 0.9)


def test_prf_uniforms_empty():
    uniforms = prf_uniforms([], secret=RR_SECRET)
    assert uniforms.shape == (0,) and uniforms.dtype == np.float64


@pytest.mark.parametrize("secret", [b"", b"short", b"x" * 15])
def test_short_secrets_are_rejected(secret):
    with pytest.raises(ValueError, match="16 bytes"):
        pseudonymous_keys(["c"], secret=secret)
    with pytest.raises(ValueError, match="16 bytes"):
        prf_uniforms([b"k"], secret=secret)


def test_load_or_create_secret_creates_private_file_then_reuses_it(tmp_path):
    path = tmp_path / "keys" / "rr.key"
    secret = load_or_create_secret(path)
    assert len(secret) == SECRET_BYTES
    assert path.read_bytes() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    assert load_or_create_secret(tmp_path / "other.key") != secret


def test_load_or_create_secret_rejects_short_file(tmp_path):
    path = tmp_path / "weak.key"
    path.write_bytes(b"0123456789")
    with pytest.raises(ValueError) as excinfo:
        load_or_create_secret(path)
    assert str(path) in str(excinfo.value)
    assert path.read_bytes() == b"0123456789"
