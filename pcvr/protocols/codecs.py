"""Compression of adapter gradients and weight deltas: top-k, stochastic quantization.

A codec maps a float32 vector of known length n to a compact frame of bytes:

* top-k sparsification keeps the k = ⌈F·n⌉ entries of largest magnitude (Aji &
  Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017;
  Stich et al., "Sparsified SGD with Memory", NeurIPS 2018);
* unbiased stochastic quantization to b ∈ {8, 4} bits with one max-abs scale per
  block of values (QSGD, Alistarh et al., NeurIPS 2017): with s = max|v| over the
  block and L = 2^(b−1) − 1, x = v/s·L ∈ [−L, L] is rounded to ⌊x⌋ + 1 with
  probability x − ⌊x⌋, else ⌊x⌋, and decodes to q·s/L. So E[decoded] = v exactly
  and Var ≤ (s/L)²/4 per entry; the block's max-magnitude entry is sent exactly.

Both are biased or noisy, so a sender keeps what it did not transmit and adds it to
the next vector (error feedback: Seide et al., "1-Bit SGD", Interspeech 2014;
Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019): the sum of what was
sent then differs from the sum of the true vectors by the residual alone.

Frame format. The receiver already knows the codec and n, so neither is sent:

* ``none``: n float32, little-endian; exactly 4n bytes.
* ``q8`` / ``q4``: m = n values in ⌈m / block_size⌉ blocks: the blocks' scales as
  float32 LE (finite, ≥ 0, sign bit clear), then the values: for 8 bits one int8
  per value in [−127, 127]; for 4 bits one nibble q + 8 ∈ [1, 15] per value, two per
  byte, low nibble first, an odd count padded with a zero nibble.
* ``topk:F[+q8|+q4]``: varint k, then k varint gaps (the first kept index, then
  the differences of the sorted indices, each ≥ 1), then the m = k kept values:
  quantized as above, or k float32 LE.

Varints are unsigned LEB128 (7 bits per byte, low group first, high bit set on all
but the last byte), canonical (no trailing zero groups) and below 2^32, so at most
5 bytes. :func:`decode` accepts exactly the frames :func:`encode` can produce in
shape and raises :class:`CodecError` for anything else.
"""

from __future__ import annotations

import dataclasses
import enum
import fractions
import math
import re

import numpy as np

__all__ = ["CodecError", "Quantization", "Codec", "encode", "decode", "compress_with_feedback", "max_frame_size"]

MAX_LENGTH = 2**32 - 1  # indices and counts travel as 32-bit varints
_VARINT_BYTES = 5
DEFAULT_BLOCK_SIZE = 64
_DECIMAL = re.compile(r"(\d+\.?\d*|\.\d+)([eE]-?\d+)?")
_FORMS = "none, q8, q4, topk:F, topk:F+q8 or topk:F+q4 (0 < F <= 1), q8/q4 optionally followed by +block:B (B >= 1)"


class CodecError(ValueError):
    """A frame that cannot be decoded; the text says why."""


class Quantization(enum.Enum):
    """How values travel: raw float32, or stochastically rounded to 8 or 4 bits."""

    NONE = "none"
    Q8 = "q8"
    Q4 = "q4"

    @property
    def bits(self) -> int | None:
        """Bits per value; None for raw float32."""
        return {Quantization.NONE: None, Quantization.Q8: 8, Quantization.Q4: 4}[self]

    @property
    def levels(self) -> int | None:
        """L = 2^(bits−1) − 1: values are integers in [−L, L] times scale / L."""
        return None if self.bits is None else 2 ** (self.bits - 1) - 1


@dataclasses.dataclass(frozen=True)
class Codec:
    """One compression scheme; its text form is what run configs and messages carry.

    Attributes:
        topk_fraction: keep the ⌈F·n⌉ largest-magnitude entries, 0 < F ≤ 1; None
            sends every entry.
        quantization: how the sent values are coded.
        block_size: values per quantization scale (only used when quantized).
    """

    topk_fraction: float | None = None
    quantization: Quantization = Quantization.NONE
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        fraction = self.topk_fraction
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not (math.isfinite(fraction) and 0.0 < fraction <= 1.0)
        ):
            raise ValueError(f"topk_fraction must be in (0, 1] or None; got {fraction!r}")
        if not isinstance(self.quantization, Quantization):
            raise ValueError(f"quantization must be a Quantization; got {self.quantization!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1; got {self.block_size!r}")

    @classmethod
    def parse(cls, text: str) -> Codec:
        """Reads ``none``, ``q8``, ``q4``, ``topk:F``, ``topk:F+q8``, ``topk:F+q4``.

        ``+block:B`` may follow q8/q4 to set a block size other than 64.
        """
        parts = text.split("+")
        if parts == ["none"]:
            return cls()
        fraction: float | None = None
        quantization = Quantization.NONE
        block_size = DEFAULT_BLOCK_SIZE
        try:
            if parts[0].startswith("topk:") and _DECIMAL.fullmatch(parts[0][len("topk:") :]):
                fraction = float(parts.pop(0)[len("topk:") :])
            if parts and parts[0] in (Quantization.Q8.value, Quantization.Q4.value):
                quantization = Quantization(parts.pop(0))
                if parts and parts[0].startswith("block:") and parts[0][len("block:") :].isdigit():
                    block_size = int(parts.pop(0)[len("block:") :])
            if parts or (fraction is None and quantization is Quantization.NONE):
                raise ValueError("unrecognised")
            return cls(topk_fraction=fraction, quantization=quantization, block_size=block_size)
        except ValueError:
            raise ValueError(f"codec must be one of {_FORMS}; got {text!r}") from None

    def __str__(self) -> str:
        parts = []
        if self.topk_fraction is not None:
            parts.append(f"topk:{float(self.topk_fraction)!r}")
        if self.quantization is not Quantization.NONE:
            parts.append(self.quantization.value)
            if self.block_size != DEFAULT_BLOCK_SIZE:
                parts.append(f"block:{self.block_size}")
        return "+".join(parts) or "none"

    @property
    def is_identity(self) -> bool:
        """True only for ``none``: dense float32, decoded bit for bit."""
        return self.topk_fraction is None and self.quantization is Quantization.NONE

    def kept(self, n: int) -> int:
        """Entries sent for a vector of length n: ⌈F·n⌉ (F read as the decimal it prints as)."""
        _check_length(n, error=ValueError)
        if self.topk_fraction is None:
            return n
        # Fraction("0.07") * 100 is exactly 7, where 0.07 * 100 in binary floats is 7.000000000000001.
        return math.ceil(fractions.Fraction(repr(float(self.topk_fraction))) * n)  # in [1, n]: 0 < F <= 1


def _check_length(length: int, *, error: type[ValueError]) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 1 <= length <= MAX_LENGTH:
        raise error(f"length must be an int in [1, {MAX_LENGTH}]; got {length!r}")
    return int(length)


def _check_vector(vector: np.ndarray) -> np.ndarray:
    values = np.asarray(vector)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"codecs take a non-empty 1-d vector; got shape {values.shape}")
    _check_length(values.size, error=ValueError)
    with np.errstate(over="ignore"):
        values = values.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"vector has {bad.size} non-finite float32 entries (first at index {bad[0]})")
    return values


def _varints(values: np.ndarray) -> bytes:
    """Canonical LEB128 bytes of non-negative integers below 2^32."""
    shifts = np.arange(_VARINT_BYTES, dtype=np.uint64) * np.uint64(7)
    values = values.astype(np.uint64)[:, None]  # [m, 1]
    sizes = 1 + (values >= (np.uint64(1) << shifts[1:])).sum(axis=1, keepdims=True)  # [m, 1]
    groups = ((values >> shifts) & np.uint64(0x7F)).astype(np.uint8)  # [m, 5], low group first
    position = np.arange(_VARINT_BYTES)
    groups |= np.where(position < sizes - 1, 0x80, 0).astype(np.uint8)  # continuation bits
    return groups[position < sizes].tobytes()  # row by row: varint after varint


def _read_varints(buf: np.ndarray, start: int, count: int, *, what: str) -> tuple[np.ndarray, int]:
    """``count`` varints from ``buf[start:]`` as uint64, and the offset just after them."""
    rest = buf[start:]
    ends = np.flatnonzero(rest < 0x80)[:count]  # every varint ends at its first byte < 0x80
    if ends.size < count:
        raise CodecError(f"frame ends inside {what} varint {ends.size} (of {count})")
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts + 1
    for check, problem in (
        (sizes > _VARINT_BYTES, f"is longer than {_VARINT_BYTES} bytes"),
        ((sizes > 1) & (rest[ends] == 0), "is not canonical (ends in a zero group)"),
        ((sizes == _VARINT_BYTES) & (rest[ends] > 0x0F), f"exceeds {MAX_LENGTH}"),
    ):
        if check.any():
            raise CodecError(f"{what} varint {np.argmax(check)} {problem}")
    groups = rest[: ends[-1] + 1].astype(np.uint64) & np.uint64(0x7F)
    shifts = 7 * (np.arange(groups.size) - np.repeat(starts, sizes)).astype(np.uint64)
    return np.add.reduceat(groups << shifts, starts), start + int(ends[-1]) + 1


def _values_size(codec: Codec, count: int) -> int:
    """Bytes of the value section for ``count`` values (scales included)."""
    bits = codec.quantization.bits
    if bits is None:
        return 4 * count
    return 4 * -(-count // codec.block_size) + -(-count * bits // 8)


def _encode_values(values: np.ndarray, codec: Codec, generator: np.random.Generator) -> bytes:
    """Raw float32, or scales then stochastically rounded integers (module docstring)."""
    levels = codec.quantization.levels
    if levels is None:
        return values.astype("<f4").tobytes()
    count, blocks = values.size, -(-values.size // codec.block_size)
    padded = np.zeros(blocks * codec.block_size, dtype=np.float32)
    padded[:count] = values
    scales = np.abs(padded.reshape(blocks, codec.block_size)).max(axis=1)  # [blocks], exact float32 maxima
    per_value = np.repeat(scales, codec.block_size)[:count].astype(np.float64)
    x = np.divide(values.astype(np.float64) * levels, per_value, out=np.zeros(count), where=per_value > 0)
    floor = np.floor(x)
    q = (floor + (generator.random(count) < x - floor)).astype(np.int8)  # E[q] = x
    if codec.quantization is Quantization.Q8:
        payload = q.tobytes()
    else:
        nibbles = np.zeros(2 * -(-count // 2), dtype=np.uint8)
        nibbles[:count] = q + 8
        payload = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    return scales.astype("<f4").tobytes() + payload


def _decode_values(buf: np.ndarray, count: int, codec: Codec) -> np.ndarray:
    """Inverse of :func:`_encode_values` on exactly the rest of the frame."""
    expected = _values_size(codec, count)
    if buf.size < expected:
        raise CodecError(f"frame is truncated: {buf.size} bytes left for {count} values, expected {expected}")
    if buf.size > expected:
        raise CodecError(f"frame has {buf.size - expected} trailing bytes")
    levels = codec.quantization.levels
    if levels is None:
        values = np.frombuffer(buf.tobytes(), dtype="<f4").astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise CodecError(f"value {bad[0]} is {values[bad[0]]} (values must be finite)")
        return values
    blocks = -(-count // codec.block_size)
    scales = np.frombuffer(buf[: 4 * blocks].tobytes(), dtype="<f4")
    bad = np.flatnonzero(~np.isfinite(scales) | np.signbit(scales))
    if bad.size:  # checked as float32: casting a signalling NaN would warn
        raise CodecError(f"scale {bad[0]} is {scales[bad[0]]} (scales must be finite and >= 0)")
    payload = buf[4 * blocks :]
    if codec.quantization is Quantization.Q8:
        q = payload.view(np.int8).astype(np.float64)
        bad = np.flatnonzero(q < -levels)
        if bad.size:
            raise CodecError(f"value {bad[0]} is -128 (8-bit values lie in [-127, 127])")
    else:
        nibbles = np.stack([payload & 0x0F, payload >> 4], axis=1).reshape(-1)
        if nibbles.size > count and nibbles[count] != 0:
            raise CodecError(f"padding nibble is {nibbles[count]}, must be 0")
        bad = np.flatnonzero(nibbles[:count] == 0)
        if bad.size:
            raise CodecError(f"value {bad[0]} has nibble 0 (4-bit values are stored as q + 8 in [1, 15])")
        q = nibbles[:count].astype(np.float64) - 8
    return (q * np.repeat(scales.astype(np.float64), codec.block_size)[:count] / levels).astype(np.float32)


def encode(vector: np.ndarray, codec: Codec, *, generator: np.random.Generator) -> bytes:
    """Compresses a vector into a frame (format in the module docstring).

    Args:
        vector: 1-d, non-empty, finite as float32, length n ≤ 2^32 − 1.
        codec: the scheme; the receiver must decode with the same one.
        generator: source of the stochastic-rounding draws (unused unless quantized).

    Returns:
        The frame; at most :func:`max_frame_size` bytes.
    """
    values = _check_vector(vector)
    if codec.topk_fraction is None:
        return _encode_values(values, codec, generator)
    n, k = values.size, codec.kept(values.size)
    indices = np.sort(np.argpartition(np.abs(values), n - k)[n - k :])  # the k largest |v|, ascending
    gaps = np.diff(indices, prepend=0)
    return _varints(np.array([k])) + _varints(gaps) + _encode_values(values[indices], codec, generator)


def decode(frame: bytes, codec: Codec, *, length: int) -> np.ndarray:
    """Reads a frame back into a dense float32 vector of ``length`` (zeros where not sent).

    Raises:
        CodecError: the frame is not one :func:`encode` could have produced in shape
            for this codec and length (or ``length`` is out of range).
        TypeError: ``frame`` is not bytes-like.
    """
    n = _check_length(length, error=CodecError)
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise TypeError(f"frame must be bytes; got {type(frame).__name__}")
    buf = np.frombuffer(frame, dtype=np.uint8)
    if codec.topk_fraction is None:
        return _decode_values(buf, n, codec)
    (k,), offset = _read_varints(buf, 0, 1, what="kept-count")
    if int(k) != codec.kept(n):
        raise CodecError(f"frame keeps {k} entries; codec {codec} keeps {codec.kept(n)} of {n}")
    gaps, offset = _read_varints(buf, offset, int(k), what="index-gap")
    repeated = np.flatnonzero(gaps[1:] == 0)
    if repeated.size:
        raise CodecError(f"indices are not strictly increasing at position {repeated[0] + 1}")
    indices = np.cumsum(gaps)  # uint64: k gaps below 2^32 cannot overflow
    if indices[-1] >= n:
        raise CodecError(f"index {indices[np.argmax(indices >= n)]} >= length {n}")
    dense = np.zeros(n, dtype=np.float32)
    dense[indices.astype(np.intp)] = _decode_values(buf[offset:], int(k), codec)
    return dense


def compress_with_feedback(
    vector: np.ndarray, residual: np.ndarray, codec: Codec, *, generator: np.random.Generator
) -> tuple[bytes, np.ndarray]:
    """Error-feedback compression: encode vector + residual, keep what was lost.

    With e_0 = 0, c_t = g_t + e_t and e_{t+1} = c_t − decode(encode(c_t)), the sum of
    decoded frames is Σ g_t − e_{T+1}: nothing is lost for good, only delayed.

    Args:
        vector: this step's vector g_t, as for :func:`encode`.
        residual: e_t, same shape (zeros on the first step).
        codec: the scheme.
        generator: stochastic-rounding draws.

    Returns:
        (frame, e_{t+1} as float32).
    """
    values = _check_vector(vector)
    residual = np.asarray(residual, dtype=np.float32)
    if residual.shape != values.shape:
        raise ValueError(f"residual shape {residual.shape} != vector shape {values.shape}")
    corrected = values + residual
    frame = encode(corrected, codec, generator=generator)
    return frame, corrected - decode(frame, codec, length=values.size)


def max_frame_size(codec: Codec, *, length: int) -> int:
    """Upper bound on ``len(encode(v, codec))`` for any v of ``length``.

    Exact for dense codecs. For top-k only the index varints vary: their gaps sum to
    the last index ≤ n − 1, and the bound spends that budget on the cheapest extra
    varint bytes first (a gap needs ≥ 128 for 2 bytes, ≥ 2^14 for 3, ...).
    """
    n = _check_length(length, error=ValueError)
    k = codec.kept(n)
    if codec.topk_fraction is None:
        return _values_size(codec, k)
    gap_bytes, budget, upgradable = k, n - 1, k
    for j in range(1, _VARINT_BYTES):
        step = (1 << (7 * j)) - (1 << (7 * (j - 1)) if j > 1 else 0)
        upgradable = min(upgradable, budget // step)
        gap_bytes += upgradable
        budget -= upgradable * step
    return len(_varints(np.array([k]))) + gap_bytes + _values_size(codec, k)
