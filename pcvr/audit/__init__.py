"""Label-inference attacks on what the platform received, and how to score them against the label-DP bound."""
