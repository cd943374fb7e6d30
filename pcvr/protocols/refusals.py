"""Why a clean room did not serve an instruction: fixed reason codes, the only detail that crosses.

A clean room answers an instruction it will not or cannot serve with a Flower
error whose code is a :class:`Refusal` and whose reason is that code's fixed
text. Nothing else about the failure leaves the clean room: an exception's text
could carry paths, and under DP-SGD exact counts. The details go to the clean
room's own log.
"""

from __future__ import annotations

import enum

__all__ = ["Refusal", "Refused"]


class Refusal(enum.IntEnum):
    """A clean room's reason for answering with an error (the Flower error code)."""

    MALFORMED = 1
    FAILED = 2
    BAD_NAME = 3
    LABEL_SET_NOT_ALLOWED = 4
    CODEC_NOT_ALLOWED = 5
    BATCH_BELOW_FLOOR = 6
    TOO_FEW_ROWS = 7
    DP_SGD_REQUIRED = 8
    DP_BUDGET_SPENT = 9
    RELEASES_PER_RUN_SPENT = 10
    RELEASES_TOTAL_SPENT = 11
    BACKBONE_MISMATCH = 12

    @property
    def reason(self) -> str:
        """The fixed text sent with this code."""
        return f"{self.name.lower()}: {_REASONS[self]}"

    @classmethod
    def describe(cls, code: int) -> str:
        """What a received error code means; a code that is not a refusal is named, never trusted as text."""
        try:
            return cls(code).reason
        except ValueError:
            return f"error code {code} (not a clean-room refusal)"


_REASONS = {
    Refusal.MALFORMED: "the instruction does not follow the protocol",
    Refusal.FAILED: "the clean room could not compute this round; the details stay in its own log",
    Refusal.BAD_NAME: "a name in the run config is not a plain name inside the clean room",
    Refusal.LABEL_SET_NOT_ALLOWED: "the clean room's policy does not allow training on this label set",
    Refusal.CODEC_NOT_ALLOWED: "the clean room's policy does not allow this gradient codec",
    Refusal.BATCH_BELOW_FLOOR: "the batch size asked for is below the clean room's minimum",
    Refusal.TOO_FEW_ROWS: "the clean room has fewer rows than its minimum batch",
    Refusal.DP_SGD_REQUIRED: "the clean room's policy requires DP-SGD noise this run does not have",
    Refusal.DP_BUDGET_SPENT: "the clean room's DP-SGD budget would be exceeded",
    Refusal.RELEASES_PER_RUN_SPENT: "the clean room's policy allows no more gradient releases in this run",
    Refusal.RELEASES_TOTAL_SPENT: "the clean room's policy allows no more gradient releases",
    Refusal.BACKBONE_MISMATCH: "the clean room's backbone is not the platform's",
}


class Refused(Exception):
    """Raised inside a clean room to answer with ``refusal``; ``detail`` stays in its log."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(f"{refusal.name}: {detail}")
        self.refusal = refusal
        self.detail = detail
