"""Adapter weights to each clean room as compressed deltas against what it acknowledged.

The platform keeps, per clean room, a mirror of the weights that clean room holds
(exactly: the mirror is updated with the *decoded* delta, the same arithmetic the
clean room does). Each round it sends ``codec(current − mirror)``. Whatever a lossy
codec drops this round is still in the next round's difference, so the clean room's
copy never drifts further than one round's compression error from the platform's.

A clean room's copy is known only once it acknowledges a round (a valid reply). If a
round goes unacknowledged — a rejected or missing reply, a restarted clean room —
the mirror is forgotten and the next instruction carries the full weights, dense.

With the lossless codec (``none``) every instruction carries the full weights: a dense
delta would cost as many bytes, and the clean room would hold the float32 sum
``base + (weights − base)``, which can differ from the weights in the last bit. So the
clean rooms compute on exactly the platform's weights, and a resumed run (which
starts with full weights) continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcvr.protocols.codecs import Codec, decode, encode

__all__ = ["Downlink", "Outgoing"]

FULL = Codec.parse("none")


@dataclass(frozen=True)
class Outgoing:
    """One clean room's instruction payload for one round."""

    base_round: int  # 0: full weights
    codec: Codec
    frame: bytes
    applied_round: int  # the newest round whose reply from this clean room was applied (0: none known)


class Downlink:
    """Per-clean-room mirrors of the weights each one holds."""

    def __init__(self, codec: Codec, *, length: int, seed: int) -> None:
        self.codec = codec
        self.length = length
        self.seed = seed
        self._held: dict[int, tuple[int, np.ndarray]] = {}  # node → (acknowledged round, weights)
        self._pending: dict[int, tuple[int, np.ndarray]] = {}  # node → (round sent, weights it will hold)

    def prepare(self, node_id: int, *, round_: int, weights: np.ndarray) -> Outgoing:
        """The payload that brings ``node_id`` to ``weights`` for ``round_``."""
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != (self.length,):
            raise ValueError(f"weights have shape {weights.shape}; expected ({self.length},)")
        held = self._held.get(node_id)
        applied_round = 0 if held is None else held[0]
        if held is None or self.codec == FULL:
            base_round, codec, base = 0, FULL, np.zeros(self.length, dtype=np.float32)
        else:
            (base_round, base), codec = held, self.codec
        generator = np.random.default_rng(np.random.SeedSequence([self.seed, round_, node_id % 2**63, 1]))
        frame = encode(weights - base, codec, generator=generator)
        self._pending[node_id] = (round_, base + decode(frame, codec, length=self.length))
        return Outgoing(base_round=base_round, codec=codec, frame=frame, applied_round=applied_round)

    def acknowledge(self, node_id: int, *, round_: int) -> None:
        """``node_id`` replied validly to ``round_``: it now holds what was sent for it."""
        pending = self._pending.pop(node_id, None)
        if pending is None or pending[0] != round_:
            raise ValueError(f"node {node_id} acknowledged round {round_}, which was not sent to it")
        self._held[node_id] = pending

    def forget(self, node_id: int) -> None:
        """``node_id``'s copy is unknown now; its next instruction carries the full weights."""
        self._held.pop(node_id, None)
        self._pending.pop(node_id, None)

    def held(self, node_id: int) -> tuple[int, np.ndarray] | None:
        """(acknowledged round, weights) for ``node_id``, if known."""
        return self._held.get(node_id)
