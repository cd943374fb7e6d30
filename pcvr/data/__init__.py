"""Data: the synthetic world with ground truth, and validated readers for real inputs."""
