"""Top-k, stochastic quantization, error feedback and strict frames (pcvr.protocols.codecs)."""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest

from pcvr.protocols.codecs import (
    Codec,
    CodecError,
    Quantization,
    compress_with_feedback,
    decode,
    encode,
    max_frame_size,
)

FORMS = ("none", "q8", "q4", "topk:0.05", "topk:0.05+q8", "topk:0.05+q4")
LENGTHS = (1, 7, 65, 4466)
ADAPTER_LENGTH = 4466
BLOCK_SIZE = 64  # the codecs' default
Z_BAND = 5.0  # |z| ≤ 5 on every coordinate: P(a false alarm) < 1e-4 over a few hundred coordinates


def _vector(n: int, *, seed: int) -> np.ndarray:
    """Signed float32 values with distinct magnitudes spread over e^-3 .. e^3 (no top-k ties)."""
    rng = np.random.default_rng(seed)
    magnitudes = np.exp(rng.permutation(n) / n * 6.0 - 3.0)
    return (magnitudes * rng.choice([-1.0, 1.0], size=n)).astype(np.float32)


def _top_k_reference(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |v|, ascending, by a full sort."""
    return np.sort(np.argsort(-np.abs(values), kind="stable")[:k])


def _steps(kept_values: np.ndarray, codec: Codec) -> np.ndarray:
    """Quantization step s/L of each kept value: s is the max |v| of its block of block_size."""
    steps = np.empty(kept_values.size)
    for start in range(0, kept_values.size, codec.block_size):
        block = slice(start, start + codec.block_size)
        steps[block] = np.abs(kept_values[block]).max() / codec.quantization.levels
    return steps


def _varint(value: int) -> bytes:
    """Reference LEB128, one byte at a time."""
    out = bytearray()
    while True:
        group, value = value & 0x7F, value >> 7
        out.append(group | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


class _MidpointGenerator:
    """Stands in for np.random.Generator: every uniform is 0.5, so rounding is deterministic."""

    def random(self, size: int) -> np.ndarray:
        return np.full(size, 0.5)


# --- codec text -----------------------------------------------------------------------


@pytest.mark.parametrize("text", FORMS + ("topk:1.0", "topk:1e-05+q4", "q4+block:32", "topk:0.5+q8+block:7"))
def test_parse_and_str_round_trip(text):
    codec = Codec.parse(text)
    assert str(codec) == text
    assert Codec.parse(str(codec)) == codec


def test_parse_reads_the_parts():
    assert Codec.parse("none") == Codec()
    assert Codec.parse("topk:0.05+q4") == Codec(topk_fraction=0.05, quantization=Quantization.Q4)
    assert Codec.parse("q8+block:32") == Codec(quantization=Quantization.Q8, block_size=32)
    assert str(Codec.parse("topk:.5")) == "topk:0.5"
    assert Codec.parse("none").is_identity
    assert not any(Codec.parse(text).is_identity for text in FORMS[1:])
    assert [Quantization(t).bits for t in ("none", "q8", "q4")] == [None, 8, 4]
    assert [Quantization(t).levels for t in ("none", "q8", "q4")] == [None, 127, 7]


@pytest.mark.parametrize(
    "text",
    ["", "q16", "Q8", "topk", "topk:", "topk:0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:inf", "topk: 0.5",
     "topk:1_0", "q8+topk:0.1", "none+q8", "topk:0.1+none", "topk:0.1+q8+q4", "block:32", "topk:0.1+block:32",
     "q8+block:0", "q8+block:x", "q8+"],
)
def test_parse_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match=re.escape("topk:F+q4")) as info:
        Codec.parse(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"topk_fraction": 0.0}, {"topk_fraction": 1.01}, {"topk_fraction": math.nan}, {"topk_fraction": True},
     {"quantization": "q8"}, {"block_size": 0}, {"block_size": 2.0}],
)
def test_codec_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        Codec(**kwargs)


def test_kept_is_ceil_of_fraction_times_length():
    assert Codec.parse("topk:0.05").kept(ADAPTER_LENGTH) == 224  # ⌈223.3⌉
    assert Codec.parse("topk:0.07").kept(100) == 7  # not 8, as 0.07 * 100 in floats would give
    assert Codec.parse("topk:0.05").kept(1) == 1
    assert Codec.parse("topk:1.0").kept(7) == 7
    assert Codec.parse("q8").kept(65) == 65
    with pytest.raises(ValueError, match="length"):
        Codec.parse("topk:0.05").kept(0)


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("text", FORMS)
def test_round_trip_keeps_the_largest_entries_within_one_step(text, n):
    codec = Codec.parse(text)
    values = _vector(n, seed=n)
    decoded = decode(encode(values, codec, generator=np.random.default_rng(1)), codec, length=n)
    assert decoded.dtype == np.float32 and decoded.shape == (n,)

    kept = _top_k_reference(values, codec.kept(n))
    assert kept.size == (n if codec.topk_fraction is None else math.ceil(0.05 * n))
    dropped = np.setdiff1d(np.arange(n), kept)
    np.testing.assert_array_equal(decoded[dropped], 0.0)
    if codec.quantization is Quantization.NONE:
        np.testing.assert_array_equal(decoded[kept], values[kept])
    else:
        error = np.abs(decoded[kept].astype(np.float64) - values[kept])
        assert (error <= _steps(values[kept], codec) * (1 + 1e-6)).all()


@pytest.mark.parametrize("text", FORMS)
def test_zero_vector_decodes_to_zeros(text):
    codec = Codec.parse(text)
    frame = encode(np.zeros(100, dtype=np.float32), codec, generator=np.random.default_rng(0))
    np.testing.assert_array_equal(decode(frame, codec, length=100), 0.0)


def test_pinned_frames():
    """Byte-exact frames for hand-worked examples of each section of the format."""
    midpoint = _MidpointGenerator()
    vector = np.array([0.1, -4.0, 0.2, 3.0], dtype=np.float32)
    # top-k keeps indices 1 and 3: k = 2, gaps 1 and 2, then the two float32 values.
    assert encode(vector, Codec.parse("topk:0.5"), generator=midpoint) == b"\x02\x01\x02" + _f32(-4.0, 3.0)
    # s = 1, x = (127, -63.5): q = (127, -64) with every draw at 0.5.
    q8 = encode(np.array([1.0, -0.5], dtype=np.float32), Codec.parse("q8"), generator=midpoint)
    assert q8 == _f32(1.0) + bytes([127, 256 - 64])
    # s = 1, x = (7, -7, 3.5): q = (7, -7, 3), nibbles 15, 1, 11 and a zero pad, low nibble first.
    q4 = encode(np.array([1.0, -1.0, 0.5], dtype=np.float32), Codec.parse("q4"), generator=midpoint)
    assert q4 == _f32(1.0) + bytes([0x1F, 0x0B])


def test_index_gaps_are_leb128_varints():
    n = 2**15
    vector = np.full(n, 1e-3, dtype=np.float32)
    indices = np.array([0, 1, 128, 16_511, 32_767])  # gaps 0, 1, 127, 16383, 16256
    vector[indices] = 1.0
    codec = Codec(topk_fraction=5 / n)
    expected = _varint(5) + b"".join(_varint(int(g)) for g in np.diff(indices, prepend=0)) + _f32(*[1.0] * 5)
    assert encode(vector, codec, generator=np.random.default_rng(0)) == expected


def test_top_k_needs_no_randomness_and_quantization_is_seeded():
    values = _vector(ADAPTER_LENGTH, seed=3)
    topk, q4 = Codec.parse("topk:0.05"), Codec.parse("topk:0.05+q4")
    assert encode(values, topk, generator=np.random.default_rng(1)) == encode(values, topk, generator=_MidpointGenerator())
    assert encode(values, q4, generator=np.random.default_rng(1)) == encode(values, q4, generator=np.random.default_rng(1))
    assert encode(values, q4, generator=np.random.default_rng(1)) != encode(values, q4, generator=np.random.default_rng(2))


@pytest.mark.parametrize(
    "vector",
    [np.zeros((2, 3)), np.zeros(0), np.float32(1.0), np.array([1.0, np.nan]), np.array([np.inf]), np.array([1e39])],
    ids=["2d", "empty", "scalar", "nan", "inf", "float32-overflow"],
)
@pytest.mark.filterwarnings("error")
def test_encode_rejects_bad_vectors(vector):
    with pytest.raises(ValueError):
        encode(vector, Codec.parse("topk:0.05+q4"), generator=np.random.default_rng(0))


# --- unbiased stochastic rounding -----------------------------------------------------

UNBIASED_DRAWS = 20_000
UNBIASED_LENGTH = 128  # two blocks of 64


def _rounding_z_scores(codec: Codec, generator) -> np.ndarray:
    """z-score of the mean of UNBIASED_DRAWS decodes of one vector, per coordinate.

    The draws are one encode of the vector tiled UNBIASED_DRAWS times: blocks never
    straddle copies (64 divides 128), so each copy is quantized with the same scales and
    its own uniforms, exactly as separate encodes would be. Each decode has variance
    ≤ (s/L)²/4 per coordinate, so the mean's standard deviation is ≤ (s/L) / (2·√draws).
    """
    values = _vector(UNBIASED_LENGTH, seed=11)
    tiled = np.tile(values, UNBIASED_DRAWS)
    decoded = decode(encode(tiled, codec, generator=generator), codec, length=tiled.size)
    decoded = decoded.reshape(UNBIASED_DRAWS, UNBIASED_LENGTH).astype(np.float64)
    steps = _steps(values, codec)
    assert (decoded.var(axis=0) <= steps**2 / 4 * 1.05).all()  # the variance bound, with sampling slack
    # A block's max entry has x = ±L, an integer: it is sent exactly and has no z-score.
    exact = np.abs(values) == np.abs(values).reshape(-1, BLOCK_SIZE).max(axis=1).repeat(BLOCK_SIZE)
    np.testing.assert_array_equal(decoded[:, exact], np.broadcast_to(values[exact], (UNBIASED_DRAWS, 2)))
    sigma = steps / (2.0 * math.sqrt(UNBIASED_DRAWS))
    return ((decoded.mean(axis=0) - values) / sigma)[~exact]


@pytest.mark.parametrize("text", ["q8", "q4"])
def test_stochastic_rounding_is_unbiased(text):
    z = _rounding_z_scores(Codec.parse(text), np.random.default_rng(2024))
    assert z.size == UNBIASED_LENGTH - 2
    assert np.abs(z).max() <= Z_BAND


@pytest.mark.parametrize("text", ["q8", "q4"])
def test_unbiasedness_check_detects_round_to_nearest(text):
    """Control: with every uniform at 0.5 the rounding is deterministic and biased; the same check fails."""
    z = _rounding_z_scores(Codec.parse(text), _MidpointGenerator())
    assert np.abs(z).max() > Z_BAND
    assert (np.abs(z) > Z_BAND).mean() > 0.5


# --- error feedback -------------------------------------------------------------------

FEEDBACK_STEPS = 2000
FEEDBACK_LENGTH = 1000  # k = 50: δ = k/n = 0.05 exactly
GRAD_NORM = 1.0  # G: every g_t has ‖g_t‖ = G


def _feedback_bound(text: str) -> float:
    """Bound on ‖e_t‖ = ‖Σ sent − Σ true‖ for compressor C with ‖x − C(x)‖² ≤ (1 − δ)‖x‖².

    Then ‖e_{t+1}‖ ≤ √(1−δ)(G + ‖e_t‖), so ‖e_t‖ ≤ G·√(1−δ) / (1 − √(1−δ)) for all t
    (Stich et al. 2018; Karimireddy et al. 2019). Top-k with δ = k/n satisfies it
    deterministically. With q4 on the kept values, x − T(x) and T(x) − Q(T(x)) have
    disjoint supports and E‖T(x) − Q(T(x))‖² ≤ Σ_blocks B(s/L)²/4 ≤ ω‖T(x)‖² with
    ω = B/(4L²) = 64/196, so E‖x − C(x)‖² ≤ (1 − (1 − ω)δ)‖x‖²: the same bound with
    δ' = (1 − ω)δ, now for the root-mean-square ‖e_t‖ (Minkowski). One seeded path is
    checked against it; with ~50 independent rounding errors per step it concentrates
    well inside (the observed maximum is a few G, the bound ≈ 58 G).
    """
    delta = 50 / FEEDBACK_LENGTH
    if text.endswith("+q4"):
        delta *= 1 - BLOCK_SIZE / (4 * 7**2)
    contraction = math.sqrt(1 - delta)
    return GRAD_NORM * contraction / (1 - contraction)


@pytest.mark.parametrize("text", ["topk:0.05", "topk:0.05+q4"])
def test_error_feedback_keeps_the_sum_within_the_bound(text):
    codec, bound = Codec.parse(text), _feedback_bound(text)
    rng = np.random.default_rng(7)
    drift = np.full(FEEDBACK_LENGTH, 0.5 / math.sqrt(FEEDBACK_LENGTH))  # a dense mean gradient, ‖·‖ = 0.5
    residual = np.zeros(FEEDBACK_LENGTH, dtype=np.float32)
    true_sum, fed_back_sum, plain_sum = (np.zeros(FEEDBACK_LENGTH) for _ in range(3))
    fed_back_distance = np.empty(FEEDBACK_STEPS)
    for step in range(FEEDBACK_STEPS):
        raw = drift + rng.standard_normal(FEEDBACK_LENGTH) / math.sqrt(FEEDBACK_LENGTH)
        grad = (GRAD_NORM * raw / np.linalg.norm(raw)).astype(np.float32)
        true_sum += grad
        frame, residual = compress_with_feedback(grad, residual, codec, generator=rng)
        fed_back_sum += decode(frame, codec, length=FEEDBACK_LENGTH)
        plain_sum += decode(encode(grad, codec, generator=rng), codec, length=FEEDBACK_LENGTH)
        fed_back_distance[step] = np.linalg.norm(fed_back_sum - true_sum)
    assert residual.dtype == np.float32
    # Σ sent = Σ true − e_T (up to float32 rounding of the residual).
    assert fed_back_distance[-1] == pytest.approx(np.linalg.norm(residual), rel=1e-3)
    assert fed_back_distance.max() <= bound
    # Control: without feedback the dropped part of the mean gradient piles up, far past the bound.
    assert np.linalg.norm(plain_sum - true_sum) > 10 * bound


def test_feedback_with_lossless_codec_leaves_no_residual():
    values = _vector(65, seed=5)
    frame, residual = compress_with_feedback(values, np.zeros(65), Codec.parse("none"), generator=np.random.default_rng(0))
    np.testing.assert_array_equal(decode(frame, Codec.parse("none"), length=65), values)
    np.testing.assert_array_equal(residual, 0.0)
    with pytest.raises(ValueError, match="residual shape"):
        compress_with_feedback(values, np.zeros(64), Codec.parse("none"), generator=np.random.default_rng(0))


# --- sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("text", FORMS)
def test_max_frame_size_bounds_the_frame(text, n):
    codec = Codec.parse(text)
    size = len(encode(_vector(n, seed=n), codec, generator=np.random.default_rng(0)))
    assert size <= max_frame_size(codec, length=n)
    if codec.topk_fraction is None:
        assert size == max_frame_size(codec, length=n)
    if text == "none":
        assert size == 4 * n


def test_adapter_reply_is_small():
    values = _vector(ADAPTER_LENGTH, seed=0)
    size = len(encode(values, Codec.parse("topk:0.05+q4"), generator=np.random.default_rng(0)))
    assert size <= 400
    assert 4 * ADAPTER_LENGTH / size > 40


def test_max_frame_size_is_tight_for_spread_indices():
    """Kept indices 128 apart: every gap but the first needs 2 bytes, as the bound assumes."""
    n, k = 2**15, 256
    vector = np.full(n, 1e-3, dtype=np.float32)
    vector[127 + 128 * np.arange(k)] = 1.0
    codec = Codec(topk_fraction=k / n)
    assert len(encode(vector, codec, generator=np.random.default_rng(0))) == max_frame_size(codec, length=n)


# --- strict decoding ------------------------------------------------------------------

TOPK_HALF = Codec.parse("topk:0.5")  # n = 4: k = 2
TOPK_VALUES = _f32(-4.0, 3.0)
SIGNALLING_NAN = bytes.fromhex("0100807f")  # float32 0x7f800001: casting it to float64 warns


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    ("text", "length", "frame", "message"),
    [
        ("none", 3, _f32(1, 2, 3)[:-1], "truncated"),
        ("none", 3, _f32(1, 2, 3) + b"\x00", "frame has 1 trailing bytes"),
        ("none", 3, _f32(1, math.nan, 3), "value 1 is nan"),
        ("none", 3, _f32(1, 2, -math.inf), "value 2 is -inf"),
        ("none", 1, SIGNALLING_NAN, "value 0 is nan"),
        ("none", 0, b"", "length must be"),
        ("none", -1, b"", "length must be"),
        ("none", 2**32, b"", "length must be"),
        ("q8", 3, _f32(-1.0) + bytes(3), "scale 0 is -1.0"),
        ("q8", 3, _f32(-0.0) + bytes(3), "scale 0 is -0.0"),
        ("q8", 3, _f32(math.nan) + bytes(3), "scale 0 is nan"),
        ("q8", 3, _f32(math.inf) + bytes(3), "scale 0 is inf"),
        ("q8", 3, SIGNALLING_NAN + bytes(3), "scale 0 is nan"),
        ("q8", 3, _f32(1.0) + bytes([1, 0x80, 2]), "value 1 is -128"),
        ("q8", 3, _f32(1.0) + bytes(2), "truncated"),
        ("q4", 3, _f32(1.0) + bytes([0x80, 0x08]), "value 0 has nibble 0"),
        ("q4", 3, _f32(1.0) + bytes([0x88, 0x88]), "padding nibble is 8"),
        ("topk:0.5", 4, b"\x00", "keeps 0 entries"),
        ("topk:0.5", 4, b"\x05", "keeps 5 entries"),
        ("topk:0.5", 4, b"\x01\x00" + _f32(1.0), "keeps 1 entries"),
        ("topk:0.5", 4, b"\x82", "ends inside kept-count varint 0"),
        ("topk:0.5", 4, b"\x02\x01\x82", "ends inside index-gap varint 1"),
        ("topk:0.5", 4, b"\x02\x01" + b"\x80" * 5 + b"\x00", "index-gap varint 1 is longer than 5 bytes"),
        ("topk:0.5", 4, b"\x02\x81\x00\x01" + TOPK_VALUES, "index-gap varint 0 is not canonical"),
        ("topk:0.5", 4, b"\x02\x01\xff\xff\xff\xff\x1f" + TOPK_VALUES, "exceeds 4294967295"),
        ("topk:0.5", 4, b"\x02\x01\x00" + TOPK_VALUES, "not strictly increasing at position 1"),
        ("topk:0.5", 4, b"\x02\x01\x03" + TOPK_VALUES, "index 4 >= length 4"),
        ("topk:0.5", 4, b"\x02\x01\x02" + TOPK_VALUES + b"\x00\x00", "frame has 2 trailing bytes"),
        ("topk:0.5", 4, b"\x02\x01\x02" + TOPK_VALUES[:-1], "truncated"),
        ("topk:0.5", 4, b"\x02\x01\x02" + _f32(math.inf, 3.0), "value 0 is inf"),
        ("topk:0.5+q8", 4, b"\x02\x01\x02" + _f32(-2.0) + bytes(2), "scale 0 is -2.0"),
        ("topk:0.5+q4", 4, b"\x02\x01\x02" + _f32(1.0) + bytes([0x80]), "value 0 has nibble 0"),
    ],
)
def test_decode_rejects_malformed_frames(text, length, frame, message):
    with pytest.raises(CodecError, match=re.escape(message)):
        decode(frame, Codec.parse(text), length=length)


def test_malformed_cases_are_one_edit_from_valid_frames():
    """Control for the table above: the well-formed neighbours decode."""
    np.testing.assert_array_equal(decode(b"\x02\x01\x02" + TOPK_VALUES, TOPK_HALF, length=4), [0, -4, 0, 3])
    q8 = decode(_f32(1.0) + bytes([1, 0x81, 2]), Codec.parse("q8"), length=3)
    np.testing.assert_allclose(q8, np.array([1, -127, 2]) / 127, rtol=1e-7)
    q4 = decode(_f32(1.0) + bytes([0x98, 0x0F]), Codec.parse("q4"), length=3)
    np.testing.assert_allclose(q4, np.array([0, 1, 7]) / 7, rtol=1e-7)


def test_decode_rejects_a_mismatched_codec_or_length():
    values = _vector(ADAPTER_LENGTH, seed=4)
    frame = encode(values, Codec.parse("topk:0.05+q4"), generator=np.random.default_rng(0))
    for codec, length in [("topk:0.1+q4", ADAPTER_LENGTH), ("topk:0.05+q8", ADAPTER_LENGTH),
                          ("topk:0.05+q4", ADAPTER_LENGTH + 100), ("q4", ADAPTER_LENGTH)]:
        with pytest.raises(CodecError):
            decode(frame, Codec.parse(codec), length=length)
    with pytest.raises(TypeError):
        decode("not bytes", Codec.parse("none"), length=1)  # type: ignore[arg-type]


MUTATIONS_PER_FORM = 1000
SPECIAL_FLOATS = [_f32(math.nan), SIGNALLING_NAN, _f32(math.inf), _f32(-math.inf), _f32(-0.0), _f32(-1.0)]


def _mutate(frame: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(frame)
    kind = rng.integers(6)
    if kind == 0:  # truncate
        return bytes(data[: rng.integers(len(data))])
    if kind == 1:  # flip 1-3 bits
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        return bytes(data)
    if kind == 2:  # overwrite a byte
        data[rng.integers(len(data))] = rng.integers(256)
        return bytes(data)
    if kind == 3:  # insert a byte
        data.insert(int(rng.integers(len(data) + 1)), int(rng.integers(256)))
        return bytes(data)
    if kind == 4 and len(data) >= 4:  # a special float32 over a word (hits scales and raw values)
        start = int(rng.integers(len(data) - 3))
        data[start : start + 4] = SPECIAL_FLOATS[rng.integers(len(SPECIAL_FLOATS))]
        return bytes(data)
    return bytes(data) + rng.bytes(int(rng.integers(1, 9)))  # append


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("text", FORMS)
def test_mutated_frames_raise_codec_error_or_decode_cleanly(text):
    codec, rng, n = Codec.parse(text), np.random.default_rng(99), 300
    frames = [encode(_vector(n, seed=seed), codec, generator=rng) for seed in range(10)]
    outcomes = {"rejected": 0, "decoded": 0}
    for trial in range(MUTATIONS_PER_FORM):
        frame = _mutate(frames[trial % len(frames)], rng)
        try:
            decoded = decode(frame, codec, length=n)
        except CodecError:
            outcomes["rejected"] += 1
            continue
        outcomes["decoded"] += 1
        assert decoded.dtype == np.float32 and decoded.shape == (n,)
        assert np.isfinite(decoded).all()
    assert outcomes["rejected"] > MUTATIONS_PER_FORM // 4  # length changes alone are a third or more
