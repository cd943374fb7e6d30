"""Why a clean room did not serve an instruction: fixed reason codes, the only detail that crosses.

A clean room answers an instruction it will not or cannot serve with a Flower
error whose code is a :class:`Refusal` and whose reason is that code's fixed
text. Nothing else about the failure leaves the clean room: an exception's text
could carry paths, and under DP-SGD exact counts. The details go to the clean
room's own log.
"""

from __future__ import annotations

import enum

from flwr.common.constant import ErrorCode

__all__ = ["Refusal", "Refused"]


class Refusal(enum.IntEnum):
    """A clean room's reason for answering with an error (the Flower error code).

    The codes start at 1001, clear of Flower's own ``flwr.common.constant.ErrorCode``
    values (0–8: a ClientApp that raised or crashed, a node the SuperLink could not
    reach, ...), so a refusal is never mistaken for a Flower failure or the reverse.
    """

    MALFORMED = 1001
    FAILED = 1002
    BAD_NAME = 1003
    LABEL_SET_NOT_ALLOWED = 1004
    CODEC_NOT_ALLOWED = 1005
    BATCH_BELOW_FLOOR = 1006
    TOO_FEW_ROWS = 1007
    DP_SGD_REQUIRED = 1008
    DP_BUDGET_SPENT = 1009
    RELEASES_PER_RUN_SPENT = 1010
    RELEASES_TOTAL_SPENT = 1011
    BACKBONE_MISMATCH = 1012
    NO_HOLDOUT = 1013

    @property
    def reason(self) -> str:
        """The fixed text sent with this code."""
        return f"{self.name.lower()}: {_REASONS[self]}"

    @classmethod
    def describe(cls, code: int) -> str:
        """What a received error code means; a code that is not a refusal is named, never trusted as text."""
        if cls.is_refusal(code):
            return cls(code).reason
        flower = _FLOWER_ERRORS.get(code)
        if flower is not None:
            return f"Flower error {flower} (code {code})"
        return f"error code {code} (neither a clean-room refusal nor a Flower error)"

    @classmethod
    def is_refusal(cls, code: int) -> bool:
        return code in cls._value2member_map_


_FLOWER_ERRORS = {
    getattr(ErrorCode, name): name for name in vars(ErrorCode) if name.isupper() and isinstance(getattr(ErrorCode, name), int)
}


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
    Refusal.NO_HOLDOUT: "the clean room holds no held-out split for this label set",
}


class Refused(Exception):
    """Raised inside a clean room to answer with ``refusal``; ``detail`` stays in its log."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(f"{refusal.name}: {detail}")
        self.refusal = refusal
        self.detail = detail
