"""Column names and value sets of every table that pcvr reads or writes.

Names are defined once here; readers validate against them (``pcvr.data.io``).
"""

from __future__ import annotations

import enum

# Platform feature log: one row per click.
CLICK_ID = "click_id"
USER_ID = "user_id"
AD_ID = "ad_id"
ADVERTISER_ID = "advertiser_id"
TIMESTAMP = "timestamp"
CATEGORICAL_FIELDS = (USER_ID, AD_ID, ADVERTISER_ID, "user_segment", "user_geo", "user_device", "ad_category", "ad_format")
LATENT_DIM = 8
DENSE_FIELDS = tuple(f"user_dense_{i}" for i in range(LATENT_DIM)) + tuple(
    f"ad_dense_{i}" for i in range(LATENT_DIM)
) + ("hour_sin", "hour_cos")
FEATURE_COLUMNS = (CLICK_ID, *CATEGORICAL_FIELDS, *DENSE_FIELDS, TIMESTAMP)

# Advertiser conversions: one row per click of the advertiser's ads.
CONVERTED = "converted"
CONVERSION_TYPE = "conversion_type"
CONSENT = "consent"
CONVERSION_COLUMNS = (CLICK_ID, CONVERTED, CONVERSION_TYPE, TIMESTAMP, CONSENT)
CONVERSION_TYPES = ("none", "add_to_cart", "checkout", "purchase")

# Ground truth, present only in simulated data (pretraining and holdout sets).
LABEL = "label"
TRUE_PROB = "true_prob"

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
