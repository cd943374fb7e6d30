"""Column names of the tables pcvr itself writes, and the consent levels.

A user's own files are described by a dataset spec (:mod:`pcvr.data.spec`); the
synthetic world's column names are its own (:mod:`pcvr.data.synth`).
"""

from __future__ import annotations

import enum

# Clean-room inputs: pseudonymous join key instead of any raw id.
JOIN_KEY = "join_key"
NOISY_LABEL = "noisy_label"
EPSILON = "epsilon"
FLIP_PROB = "flip_prob"
LABEL_COLUMNS = (JOIN_KEY, NOISY_LABEL, EPSILON, FLIP_PROB)


class ConsentLevel(enum.Enum):
    """A user's choice about the use of their conversions."""

    STANDARD = "standard"
    LIMITED = "limited"
    OPT_OUT = "opt_out"

    @classmethod
    def parse(cls, value: str) -> "ConsentLevel":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(level.value for level in cls)
            raise ValueError(f"unknown consent level {value!r} (expected one of {choices})") from None
