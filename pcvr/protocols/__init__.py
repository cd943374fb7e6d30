"""Everything that crosses a party boundary: label-DP mechanisms, keys, messages."""
